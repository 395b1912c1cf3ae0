"""VGG: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015 (configurations A, B, D, E = VGG-11, 13, 16, 19), as torchvision builds it.

Five blocks of 3x3 convolutions (64, 128, 256, 512, 512 channels), each closed by a 2x2 max pool,
then an adaptive 7x7 average pool and the classifier fc6 4096 -> fc7 4096 -> fc8, each hidden layer
followed by ReLU and dropout. VGG-16 has 138,357,544 parameters at 1000 classes; `_bn` variants
put a BatchNorm after every convolution, which keeps its bias as in torchvision (138,365,992).
The flatten before fc6 is in NHWC order; a torchvision importer must permute fc6's inputs.

Stages: stem = block 1, stage1..stage4 = blocks 2-5 (convs named conv1, conv2, ... and bn1, ...
inside each block), stage5 = fc6, stage6 = fc7, head = fc8.

Options: `norm` ('none' for vggNN, 'batch' fixed for vggNN_bn, 'group'), `cifar_stem` (the conv
stack is unchanged -- 32x32 inputs reach 1x1 after five pools -- but the map is pooled to 1x1
and the hidden layers are 512 wide, the usual CIFAR VGG), `width` (convs and hidden layers),
`dropout`, `dtype`, `conv_general_dilated`. Inputs must be at least 32x32.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cnn_arch.models import common

_CHANNELS = (64, 128, 256, 512, 512)
_STAGES = ('stem', 'stage1', 'stage2', 'stage3', 'stage4')


class VGG(nn.Module):
  """VGG with `block_sizes[i]` 3x3 convolutions in block i (see the module docstring)."""
  block_sizes: Sequence[int]
  num_classes: int = 1000
  norm: str = 'none'
  bn_axis_name: str | None = None
  cifar_stem: bool = False
  width: float = 1.0
  dropout: float = 0.5
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @property
  def stage_names(self) -> tuple[str, ...]:
    return _STAGES + ('stage5', 'stage6', common.HEAD)

  @property
  def min_size(self) -> int:
    return 32  # five 2x2 pools

  @nn.compact
  def __call__(self, x, train: bool = False, frozen: int = 0, features: bool = False,
               start: int = 0):
    if not start:
      common.check_input(x, self.min_size, 'VGG')
    conv = functools.partial(common.conv, dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(common.norm, self.norm, dtype=self.dtype,
                             axis_name=self.bn_axis_name)
    dense = functools.partial(common.dense, dtype=self.dtype)
    stages = []
    for name, n, channels in zip(_STAGES, self.block_sizes, _CHANNELS, strict=True):
      layers = tuple((f'conv{j + 1}', common.scaled(channels, self.width), 3, 1, 1)
                     for j in range(n))
      stages.append((name, common.ConvStack(layers, conv, norm, pool=(2, 2), name=name)))
    hidden = common.scaled(512 if self.cifar_stem else 4096, self.width)
    fc6 = common.DenseStage(hidden, 'fc6', dense, dropout=self.dropout, name='stage5')
    fc7 = common.DenseStage(hidden, 'fc7', dense, dropout=self.dropout, name='stage6')
    grid = 1 if self.cifar_stem else 7
    stages.append(('stage5', lambda x, train: fc6(common.adaptive_avg_pool(x, grid), train)))
    stages.append(('stage6', fc7))
    x, feats = common.run_stages(stages, x, train=train, frozen=frozen, start=start)
    logits = dense(self.num_classes, name=common.HEAD)(x)
    return common.finish(common.upcast(logits), feats, x, features)


VGG11 = functools.partial(VGG, block_sizes=(1, 1, 2, 2, 2))
VGG13 = functools.partial(VGG, block_sizes=(2, 2, 2, 2, 2))
VGG16 = functools.partial(VGG, block_sizes=(2, 2, 3, 3, 3))
VGG19 = functools.partial(VGG, block_sizes=(2, 2, 4, 4, 4))
VGG11BN = functools.partial(VGG11, norm='batch')
VGG13BN = functools.partial(VGG13, norm='batch')
VGG16BN = functools.partial(VGG16, norm='batch')
VGG19BN = functools.partial(VGG19, norm='batch')
