"""GoogLeNet (Inception v1): Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, exactly as
torchvision builds it: every convolution is BasicConv2d (conv without bias, BatchNorm eps 1e-3,
ReLU), max pools use ceil_mode, and the "5x5" branch uses a 3x3 kernel (a torchvision quirk kept
for weight compatibility; `kernel_5x5=5` gives the paper's). 6,624,904 parameters at 1000 classes.

Names mirror torchvision: stem/{conv1, conv2, conv3}/{conv, bn}; stage1/inception3a/branch1,
branch2_0, branch2_1, branch3_0, branch3_1, branch4_1 (torchvision's `branch2.0` ...); head = fc.
Stages: stem = conv1..conv3 with their pools, stage1 = 3a, 3b (+pool), stage2 = 4a..4e (+pool),
stage3 = 5a, 5b; the head is global average pool, dropout (0.2) and fc.

Auxiliary classifiers (`aux_logits=True`, torchvision's InceptionAux: adaptive 4x4 average pool,
1x1 conv 128, fc 1024, dropout 0.7, fc classes) attach to the outputs of 4a ('aux1') and 4d
('aux2'), both inside stage2, and are frozen together with stage2: they run only in train mode
while stage2 is trainable (not frozen). Then the logits slot of the return value is the pair
`(logits, (aux1_logits, aux2_logits))`, each [N, num_classes] float32; with stage2 frozen it is
`(logits, ())` and the aux parameters get no gradient (the `attached_heads` property maps
'aux1' and 'aux2' to `AUX_STAGE` for freezing masks). In eval mode the model returns plain logits, as torchvision does. Their
parameters always exist (they are created at init), as top-level 'aux1' and 'aux2'.

Options: `norm` ('batch' default, 'group', 'none' -- convs then get a bias), `cifar_stem` (conv1
is 3x3 stride 1 and both stem pools go, so 32x32 inputs reach stage3 at 8x8), `width` (every
channel count, including aux widths), `dropout`, `aux_logits`, `transform_input` (torchvision's
re-normalisation of ImageNet-normalised input to [-1, 1] scaling, expected by its pretrained
weights), `naive` (Figure 2a modules: 1x1, 3x3 and 5x5 convolutions straight from the input plus
a 3x3 max pool of the input, concatenated, with no 1x1 reductions or pool projection -- so widths
grow and the op count can be compared with the reduced module), `kernel_5x5`, `dtype`,
`conv_general_dilated`. Inputs must be at least 32x32 (4x4 with `cifar_stem`).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_arch.models import common

AUX_STAGE = 'stage2'
# (name, (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection)) per stage, and the pool
# (window, stride) closing it.
_INCEPTIONS = (
    ((('inception3a', (64, 96, 128, 16, 32, 32)), ('inception3b', (128, 128, 192, 32, 96, 64))),
     (3, 2)),
    ((('inception4a', (192, 96, 208, 16, 48, 64)), ('inception4b', (160, 112, 224, 24, 64, 64)),
      ('inception4c', (128, 128, 256, 24, 64, 64)), ('inception4d', (112, 144, 288, 32, 64, 64)),
      ('inception4e', (256, 160, 320, 32, 128, 128))), (2, 2)),
    ((('inception5a', (256, 160, 320, 32, 128, 128)),
      ('inception5b', (384, 192, 384, 48, 128, 128))), None),
)
_AUX_TAPS = {'aux1': 'inception4a', 'aux2': 'inception4d'}
_MEAN, _STD = common.IMAGENET_MEAN, common.IMAGENET_STD


class BasicConv(nn.Module):
  """torchvision's BasicConv2d: conv (no bias under a norm), norm with eps 1e-3, ReLU.

  `conv` and `norm` are GoogLeNet's factories; `conv` has the bias choice bound.
  """
  features: int
  kernel: int
  conv: Callable
  norm: Callable
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv(self.features, self.kernel, self.stride, name='conv')(x)
    return nn.relu(self.norm(train=train, epsilon=1e-3, name='bn')(x))


class Inception(nn.Module):
  """One inception module with dimension reductions, or the naive one (see the docstring)."""
  widths: Sequence[int]
  conv: Callable  # BasicConv with its conv and norm factories bound
  naive: bool = False
  kernel_5x5: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    c1, c3r, c3, c5r, c5, proj = self.widths
    pooled = common.max_pool(x, 3, 1, padding=1, ceil_mode=True)
    b1 = self.conv(c1, 1, name='branch1')(x, train)
    if self.naive:
      b2 = self.conv(c3, 3, name='branch2_1')(x, train)
      b3 = self.conv(c5, self.kernel_5x5, name='branch3_1')(x, train)
      return jnp.concatenate([b1, b2, b3, pooled], axis=-1)
    b2 = self.conv(c3, 3, name='branch2_1')(self.conv(c3r, 1, name='branch2_0')(x, train), train)
    b3 = self.conv(c5, self.kernel_5x5, name='branch3_1')(
        self.conv(c5r, 1, name='branch3_0')(x, train), train)
    b4 = self.conv(proj, 1, name='branch4_1')(pooled, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class _InceptionStage(nn.Module):
  """Inception modules then an optional ceil-mode max pool; also returns each module's output."""
  modules: Sequence[tuple[str, Sequence[int]]]
  pool: tuple[int, int] | None
  inception: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    outputs = {}
    for name, widths in self.modules:
      x = outputs[name] = self.inception(widths, name=name)(x, train)
    if self.pool:
      x = common.max_pool(x, *self.pool, ceil_mode=True)
    return x, outputs


class _Stem(nn.Module):
  """conv1 7x7/2, pool, conv2 1x1, conv3 3x3, pool; for CIFAR a 3x3/1 conv1 and no pools."""
  conv: Callable
  width: float
  cifar: bool

  @nn.compact
  def __call__(self, x, train: bool):
    pool = (lambda x: x) if self.cifar else (
        lambda x: common.max_pool(x, 3, 2, ceil_mode=True))
    kernel, stride = (3, 1) if self.cifar else (7, 2)
    x = pool(self.conv(common.scaled(64, self.width), kernel, stride=stride, name='conv1')(
        x, train))
    x = self.conv(common.scaled(64, self.width), 1, name='conv2')(x, train)
    return pool(self.conv(common.scaled(192, self.width), 3, name='conv3')(x, train))


class InceptionAux(nn.Module):
  """torchvision's InceptionAux (flatten in NHWC order; importers permute fc1's inputs).

  `conv` is GoogLeNet's BasicConv factory, `dense` its dense factory.
  """
  num_classes: int
  conv: Callable
  width: float
  dropout: float
  dense: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    x = self.conv(common.scaled(128, self.width), 1, name='conv')(
        common.adaptive_avg_pool(x, 4), train)
    x = nn.relu(self.dense(common.scaled(1024, self.width), name='fc1')(
        x.reshape(x.shape[0], -1)))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return common.upcast(self.dense(self.num_classes, name='fc2')(x))


class GoogLeNet(nn.Module):
  """GoogLeNet as torchvision builds it (see the module docstring for options and returns)."""
  num_classes: int = 1000
  aux_logits: bool = False
  transform_input: bool = False
  naive: bool = False
  kernel_5x5: int = 3
  norm: str = 'batch'
  bn_axis_name: str | None = None
  cifar_stem: bool = False
  width: float = 1.0
  dropout: float = 0.2
  aux_dropout: float = 0.7
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ('stem', 'stage1', 'stage2', 'stage3', common.HEAD)

  @property
  def attached_heads(self) -> dict[str, str]:
    """Top-level parameter keys outside `stage_names`, mapped to the stage they freeze with."""
    return {name: AUX_STAGE for name in _AUX_TAPS} if self.aux_logits else {}

  @property
  def min_size(self) -> int:
    return 4 if self.cifar_stem else 32

  @nn.compact
  def __call__(self, x, train: bool = False, frozen: int = 0, features: bool = False,
               start: int = 0):
    if not start:
      common.check_input(x, self.min_size, 'GoogLeNet')
    if self.transform_input and not start:
      x = x * (jnp.array(_STD) / 0.5) + (jnp.array(_MEAN) - 0.5) / 0.5
    conv = functools.partial(common.conv, use_bias=self.norm == 'none', dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(common.norm, self.norm, dtype=self.dtype,
                             axis_name=self.bn_axis_name)
    dense = functools.partial(common.dense, dtype=self.dtype)
    basic_conv = functools.partial(BasicConv, conv=conv, norm=norm)
    inception = functools.partial(Inception, conv=basic_conv, naive=self.naive,
                                  kernel_5x5=self.kernel_5x5)
    taps = {}

    def keep_taps(stage):
      def run(x, train):
        x, outputs = stage(x, train)
        taps.update(outputs)
        return x
      return run

    stages = [('stem', _Stem(basic_conv, self.width, self.cifar_stem, name='stem'))]
    for i, (modules, pool) in enumerate(_INCEPTIONS):
      modules = tuple((n, tuple(common.scaled(c, self.width) for c in w)) for n, w in modules)
      name = f'stage{i + 1}'
      stages.append((name, keep_taps(_InceptionStage(modules, pool, inception, name=name))))
    x, feats = common.run_stages(stages, x, train=train, frozen=frozen, start=start)
    aux = self._aux(taps, basic_conv, dense, train, frozen)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.mean(axis=(1, 2)))
    logits = dense(self.num_classes, name=common.HEAD)(x)
    logits = common.upcast(logits)
    return common.finish((logits, aux) if aux is not None else logits, feats, x, features)

  def _aux(self, taps: dict, conv: Callable, dense: Callable, train: bool, frozen):
    """Aux logits in train mode (None otherwise); () while their stage is frozen."""
    if not self.aux_logits:
      return None
    trainable = train and AUX_STAGE not in common.frozen_names(frozen, self.stage_names[:-1])
    if not (trainable or self.is_initializing()):
      return () if train else None
    heads = tuple(InceptionAux(self.num_classes, conv, self.width, self.aux_dropout, dense,
                               name=name)(taps[tap], trainable)
                  for name, tap in _AUX_TAPS.items())
    return (heads if trainable else ()) if train else None
