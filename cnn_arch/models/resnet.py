"""ResNet: He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016; and
ResNeXt: Xie, Girshick, Dollar, Tu & He, "Aggregated Residual Transformations for Deep Neural
Networks", CVPR 2017 -- as torchvision builds them (v1.5: a bottleneck strides on its 3x3 conv).

One class; every depth is a `functools.partial` of it (as Flax's examples/imagenet). ResNeXt is the
bottleneck ResNet with a grouped 3x3 convolution (`feature_group_count`) of
`planes * width_per_group / 64 * groups` channels.

Names mirror torchvision: stem/{conv1, bn1}, stage1..stage4 (= layer1..layer4) holding block0,
block1, ..., each with conv1, bn1, conv2, bn2[, conv3, bn3][, downsample_conv, downsample_bn];
head = fc. Norm layers keep the `bn` names under every `norm`, so names never depend on options.

Options: `norm` ('batch' default, 'group', 'none'; with 'none' the convolutions get a bias),
`cifar_stem` (3x3 stride-1 conv1 and no max pool, for 32x32 inputs), `width` (every channel
count; ResNeXt's grouped width stays a multiple of `groups`), `dropout` (before fc, default 0),
`zero_init_residual` (zero scale on each block's last norm, Goyal et al. 2017; no effect with
norm='none'), `dtype`, `conv_general_dilated`. Inputs must be at least 32x32 (8x8 with
`cifar_stem`), the network's total stride.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_arch.models import common


class _Block(nn.Module):
  """Fields shared by both block types; `features` is the inner width, `out` the output width.

  `conv` and `norm` are ResNet's factories (`conv` has the bias choice bound).
  """
  features: int
  out: int
  conv: Callable
  norm: Callable
  stride: int = 1
  groups: int = 1
  zero_init_residual: bool = False

  def bn(self, train, *, name, last=False):
    init = nn.initializers.zeros if last and self.zero_init_residual else nn.initializers.ones
    return self.norm(train=train, scale_init=init, name=name)

  def shortcut(self, x, train):
    if x.shape[-1] == self.out and self.stride == 1:
      return x
    x = self.conv(self.out, 1, self.stride, name='downsample_conv')(x)
    return self.bn(train, name='downsample_bn')(x)


class BasicBlock(_Block):
  """Two 3x3 convolutions (ResNet-18/34)."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(self.bn(train, name='bn1')(
        self.conv(self.features, 3, self.stride, name='conv1')(x)))
    y = self.bn(train, name='bn2', last=True)(self.conv(self.out, 3, name='conv2')(y))
    return nn.relu(y + self.shortcut(x, train))


class Bottleneck(_Block):
  """1x1 reduce, (grouped) 3x3 with the stride, 1x1 expand (ResNet-50+ and ResNeXt)."""

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(self.bn(train, name='bn1')(self.conv(self.features, 1, name='conv1')(x)))
    y = nn.relu(self.bn(train, name='bn2')(
        self.conv(self.features, 3, self.stride, groups=self.groups, name='conv2')(y)))
    y = self.bn(train, name='bn3', last=True)(self.conv(self.out, 1, name='conv3')(y))
    return nn.relu(y + self.shortcut(x, train))


class _Stage(nn.Module):
  """`num_blocks` blocks named block0, block1, ...; the first one carries the stride."""
  block: Callable
  num_blocks: int
  stride: int

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_blocks):
      x = self.block(stride=self.stride if i == 0 else 1, name=f'block{i}')(x, train)
    return x


class _Stem(nn.Module):
  """conv1 7x7/2, bn1, relu, max pool 3/2 -- or, for CIFAR, a 3x3 stride-1 conv1 alone."""
  features: int
  cifar: bool
  conv: Callable
  norm: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    kernel, stride = (3, 1) if self.cifar else (7, 2)
    x = self.conv(self.features, kernel, stride, name='conv1')(x)
    x = nn.relu(self.norm(train=train, name='bn1')(x))
    return x if self.cifar else common.max_pool(x, 3, 2, padding=1)


class ResNet(nn.Module):
  """ResNet/ResNeXt with `stage_sizes[i]` blocks of `block_cls` in stage i+1."""
  stage_sizes: Sequence[int]
  block_cls: Callable
  num_classes: int = 1000
  groups: int = 1
  width_per_group: int = 64
  norm: str = 'batch'
  bn_axis_name: str | None = None
  cifar_stem: bool = False
  width: float = 1.0
  dropout: float = 0.0
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ('stem',) + tuple(f'stage{i + 1}' for i in range(len(self.stage_sizes))) + (
        common.HEAD,)

  @property
  def min_size(self) -> int:
    return 2 ** (len(self.stage_sizes) - 1) * (1 if self.cifar_stem else 4)

  @nn.compact
  def __call__(self, x, train: bool = False, frozen: int = 0, features: bool = False,
               start: int = 0):
    if not start:
      common.check_input(x, self.min_size, 'ResNet')
    conv = functools.partial(common.conv, use_bias=self.norm == 'none', dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(common.norm, self.norm, dtype=self.dtype,
                             axis_name=self.bn_axis_name)
    stages = [('stem', _Stem(common.scaled(64, self.width), self.cifar_stem, conv, norm,
                             name='stem'))]
    for i, n in enumerate(self.stage_sizes):
      block = functools.partial(self.block_cls, **self._widths(64 * 2 ** i), conv=conv,
                                norm=norm, groups=self.groups,
                                zero_init_residual=self.zero_init_residual)
      name = f'stage{i + 1}'
      stages.append((name, _Stage(block, n, 1 if i == 0 else 2, name=name)))
    x, feats = common.run_stages(stages, x, train=train, frozen=frozen, start=start)
    x = nn.Dropout(self.dropout, deterministic=not train)(x.mean(axis=(1, 2)))
    logits = common.dense(self.num_classes, dtype=self.dtype, name=common.HEAD)(x)
    return common.finish(common.upcast(logits), feats, x, features)

  def _widths(self, planes: int) -> dict[str, int]:
    """Inner and output widths of a block with torchvision's `planes`."""
    if self.block_cls is BasicBlock:
      return dict(features=common.scaled(planes, self.width),
                  out=common.scaled(planes, self.width))
    inner = planes * self.width_per_group // 64 * self.groups
    return dict(features=common.scaled(inner, self.width, self.groups),
                out=4 * common.scaled(planes, self.width))


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
ResNeXt50_32x4d = functools.partial(ResNet50, groups=32, width_per_group=4)
ResNeXt101_32x8d = functools.partial(ResNet101, groups=32, width_per_group=8)
