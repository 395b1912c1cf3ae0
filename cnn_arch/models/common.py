"""Layers shared by every architecture family, written to match PyTorch/torchvision numerics.

Why not Flax's defaults: `padding='SAME'` pads a stride-2 convolution asymmetrically (0, 1) where
PyTorch pads (1, 1), and Flax's BatchNorm uses epsilon 1e-6 where PyTorch uses 1e-5. Both break
parity with torchvision's ImageNet weights, so every family builds its layers from here.

Every model in `cnn_arch.models` follows one calling convention, implemented by `run_stages`:

    model.apply(variables, images_nhwc, train=False, frozen=0, features=False, start=0)

* `frozen=k` runs the first k stages in inference mode (BatchNorm uses and keeps its running
  statistics, dropout is off) and stops the gradient at their output, so the backward pass never
  reaches the frozen prefix (optax masking alone would still compute those gradients, optax#290).
  `frozen=('stage1', ...)` freezes the stages named (`cnn_arch.finetune`'s plans).
* `features=True` returns `(logits, feats)` where `feats` maps every stage name to its output and
  `'pre_logits'` to the vector fed to the classifier.
* `start=k` takes, instead of images, the output of the first k stages (e.g. the cached features
  of a frozen prefix, `cnn_arch.feature_cache`) and runs only the stages after them.

Only a model's top-level module has the user-facing options (`norm`, `bn_axis_name`, `dtype`,
`conv_general_dilated`, ...). As in Flax's examples/imagenet, its `__call__` binds them into
layer factories and hands its submodules (stems, stages, blocks) only those: `conv`
(`functools.partial(conv, dtype=..., conv_general_dilated=...)`, plus `use_bias` where a family's
bias depends on the norm), `norm` (`functools.partial(norm, kind, dtype=..., axis_name=...)`,
later called with `train`, `name` and any `epsilon` or `scale_init`) and `dense`
(`functools.partial(dense, dtype=...)`).
"""

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from cnn_arch.ops import conv as conv_ops

NORMS = ('batch', 'group', 'none')
# The ImageNet statistics torchvision's weights expect of their input.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HEAD = 'head'

# torchvision initialises convolutions with kaiming_normal(fan_out) for ResNet/VGG; we use it for
# every family (the scale matters for training from scratch, not for imported weights).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def scaled(channels: int, width: float, multiple: int = 1) -> int:
  """Channel count under a width multiplier, kept a positive multiple of `multiple` (groups)."""
  return max(multiple, int(round(channels * width / multiple)) * multiple)


def param_dtype(dtype: Any):
  """float32 parameters under float32 or bfloat16 compute; float64 under float64 (numerics checks)."""
  return jnp.promote_types(dtype, jnp.float32)


def upcast(x):
  """Logits for the loss: float32 at least (bfloat16 compute), float64 stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def conv(features: int, kernel: int, stride: int = 1, padding: int | None = None, *,
         groups: int = 1, use_bias: bool = False, dtype: Any = jnp.float32,
         conv_general_dilated: Callable | None = None, name: str | None = None) -> nn.Conv:
  """A PyTorch-style convolution: symmetric explicit padding (default kernel // 2), HWIO kernel.

  `conv_general_dilated` defaults to `cnn_arch.ops`' per-backend choice (plain lax off CPU).
  """
  p = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 param_dtype=param_dtype(dtype), kernel_init=conv_init,
                 conv_general_dilated=conv_general_dilated or conv_ops.default_conv_general_dilated,
                 name=name)


def dense(features: int, *, dtype: Any = jnp.float32, name: str | None = None) -> nn.Dense:
  """A fully connected layer computing in `dtype` with `param_dtype(dtype)` parameters."""
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype(dtype), name=name)


def group_count(channels: int, groups: int = 32) -> int:
  """Wu & He (2018) use 32 groups; under a width multiplier use the largest divisor <= 32."""
  return math.gcd(channels, groups)


def norm(kind: str, *, train: bool, epsilon: float = 1e-5, dtype: Any = jnp.float32,
         scale_init: Callable = nn.initializers.ones, axis_name: str | None = None,
         name: str | None = None) -> Callable:
  """Normalisation layer factory: 'batch' (PyTorch momentum 0.1 == Flax 0.9), 'group', 'none'.

  `axis_name` makes BatchNorm average its batch statistics over that mapped axis (the trainer's
  data-parallel axis), so a step gives the same result on 1 device or many.
  """
  if kind == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon,
                        dtype=dtype, param_dtype=param_dtype(dtype), scale_init=scale_init,
                        axis_name=axis_name if train else None, name=name)
  if kind == 'group':
    return _GroupNorm(epsilon=epsilon, dtype=dtype, scale_init=scale_init, name=name)
  if kind == 'none':
    return lambda x: x
  raise ValueError(f'Unknown norm {kind!r}; choose one of {NORMS}.')


class _GroupNorm(nn.Module):
  """GroupNorm whose group count adapts to the channel count (see `group_count`)."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=group_count(x.shape[-1]), epsilon=self.epsilon,
                        dtype=self.dtype, param_dtype=param_dtype(self.dtype),
                        scale_init=self.scale_init,
                        name='gn')(x)


def max_pool(x, window: int, stride: int, padding: int = 0, ceil_mode: bool = False):
  """torch.nn.MaxPool2d: symmetric -inf padding, and `ceil_mode` adds the extra right/bottom
  window that PyTorch keeps only when it starts inside the (left-padded) input."""
  pads = []
  for size in x.shape[1:3]:
    out = (size + 2 * padding - window) / stride + 1
    out = math.ceil(out) if ceil_mode else math.floor(out)
    if ceil_mode and (out - 1) * stride >= size + padding:
      out -= 1
    extra = (out - 1) * stride + window - (size + 2 * padding)
    pads.append((padding, padding + max(extra, 0)))
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           ((0, 0), pads[0], pads[1], (0, 0)))


def adaptive_avg_pool(x, output_size: int):
  """torch.nn.AdaptiveAvgPool2d: bin i covers [floor(i*H/o), ceil((i+1)*H/o))."""
  def pool_axis(x, axis):
    size = x.shape[axis]
    if size == output_size:
      return x
    bins = [lax.slice_in_dim(x, (i * size) // output_size, -(-(i + 1) * size // output_size),
                             axis=axis).mean(axis=axis, keepdims=True)
            for i in range(output_size)]
    return jnp.concatenate(bins, axis=axis)
  return pool_axis(pool_axis(x, 1), 2)


class ConvStack(nn.Module):
  """Plain conv (+ norm) + ReLU layers, then an optional max pool: one AlexNet or VGG stage.

  `layers` holds `(name, features, kernel, stride, padding)`; `conv` and `norm` are the model's
  factories (see the module docstring); each norm is named after its conv (`conv3` -> `bn3`).
  Convolutions keep their bias under BatchNorm, as torchvision's `vgg*_bn`.
  """
  layers: Sequence[tuple[str, int, int, int, int]]
  conv: Callable
  norm: Callable
  pool: tuple[int, int] | None = (2, 2)

  @nn.compact
  def __call__(self, x, train: bool):
    for name, features, kernel, stride, padding in self.layers:
      x = self.conv(features, kernel, stride, padding, use_bias=True, name=name)(x)
      x = nn.relu(self.norm(train=train, name=name.replace('conv', 'bn'))(x))
    if self.pool:
      x = max_pool(x, *self.pool)
    return x


class DenseStage(nn.Module):
  """Flatten, then Dense + ReLU with dropout: one hidden fully connected stage (fc6, fc7).

  `dense` is the model's dense factory. torchvision's AlexNet drops out before the layer, VGG and
  the AlexNet paper after it.
  """
  features: int
  layer: str
  dense: Callable
  dropout: float = 0.5
  dropout_first: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    drop = nn.Dropout(self.dropout, deterministic=not train)
    x = x.reshape(x.shape[0], -1)  # NHWC order: importers permute torch's NCHW-flattened weights
    if self.dropout_first:
      x = drop(x)
    x = nn.relu(self.dense(self.features, name=self.layer)(x))
    return x if self.dropout_first else drop(x)


def check_frozen(frozen: int, stage_names: Sequence[str]):
  """Raises a ValueError naming the valid range unless 0 <= frozen <= number of body stages."""
  body = [s for s in stage_names if s != HEAD]
  if not 0 <= frozen <= len(body):
    raise ValueError(
        f'freeze depth {frozen} is out of range: this model has {len(body)} stages before the '
        f'head ({", ".join(body)}), so use 0 (train everything) to {len(body)} (train only the '
        f'head).')


def frozen_names(frozen: int | Sequence[str], body: Sequence[str]) -> tuple[str, ...]:
  """The frozen stages of `frozen`: a count of leading stages, or the names themselves."""
  if isinstance(frozen, int):
    check_frozen(frozen, body)
    return tuple(body[:frozen])
  unknown = set(frozen) - set(body)
  if unknown:
    raise ValueError(f'frozen names {sorted(unknown)}, which are not stages before the head '
                     f'({", ".join(body)}).')
  return tuple(frozen)


def run_stages(stages: Sequence[tuple[str, Callable]], x, *, train: bool,
               frozen: int | Sequence[str], start: int = 0):
  """Runs the body `(name, fn(x, train))` stages in order (the head is not one of them).

  Returns the last output and a dict of every stage's output.

  Frozen stages (the first `frozen`, or those named) run with train=False. The output of the
  last stage of the frozen prefix is a constant for autodiff, so the backward pass stops there;
  a frozen stage above a trained one passes the gradient through to it.
  With `start=k`, `x` is the output of the first k stages, which are skipped.
  """
  names = [name for name, _ in stages]
  frozen = frozen_names(frozen, names)
  prefix = next((i for i, name in enumerate(names) if name not in frozen), len(names))
  if not 0 <= start <= len(stages):
    raise ValueError(f'start={start} is out of range: the model has {len(stages)} stages before '
                     'the head.')
  feats = {}
  for i, (name, fn) in enumerate(stages[start:], start):
    x = fn(x, train and name not in frozen)
    if i + 1 == prefix:
      x = lax.stop_gradient(x)
    feats[name] = x
  return x, feats


def check_input(x, min_size: int, name: str):
  """Fails early, with the fix, for images the network cannot take."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'{name} takes NHWC images with 3 channels, got shape {tuple(x.shape)}; '
                     'convert grayscale to RGB and put channels last.')
  if min(x.shape[1:3]) < min_size:
    raise ValueError(f'{name} needs images of at least {min_size}x{min_size}, got '
                     f'{x.shape[1]}x{x.shape[2]}; resize the input (data.image_size) or use '
                     'cifar_stem=True for small images.')


def finish(logits, feats: dict, pre_logits, features: bool):
  """The common return convention: logits, or (logits, stage outputs + 'pre_logits')."""
  if not features:
    return logits
  return logits, {**feats, 'pre_logits': pre_logits}

