"""AlexNet: Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional
Neural Networks", NeurIPS 2012; and torchvision's variant (Krizhevsky 2014, "One weird trick").

Two layouts of one class:
  * `'paper'` (`alexnet`): the single-tower network of the paper and the lecture, 227x227x3 input
    -> conv1 96 11x11/4 (55x55x96) -> max pool 3/2 (27x27x96) -> conv2 256 5x5 -> pool (13x13)
    -> conv3 384 -> conv4 384 -> conv5 256 -> pool (6x6x256) -> fc6 4096 -> fc7 4096 -> fc8.
    62,378,344 parameters at 1000 classes. Dropout follows fc6 and fc7 as in the paper. Local
    response normalisation is left out (parameter-free, and superseded by `norm='batch'`). fc6
    flattens a fixed 6x6 map, so inputs must be 227x227 (up to 258); use `alexnet_tv` otherwise.
  * `'torchvision'` (`alexnet_tv`): 64, 192, 384, 256, 256 channels, conv1 with padding 2, an
    adaptive 6x6 average pool (any input of at least 63x63), dropout *before* fc6 and fc7.
    61,100,840 parameters.

The flatten before fc6 is in NHWC order; a torchvision weight importer must permute fc6's
NCHW-flattened input dimension.

Stages follow Yosinski et al. (2014), who freeze AlexNet layer by layer: stem = conv1 (+pool),
stage1 = conv2 (+pool), stage2 = conv3, stage3 = conv4, stage4 = conv5 (+pool), stage5 = fc6,
stage6 = fc7, head = fc8.

Options: `norm` ('none' default, 'batch', 'group'; after each conv, before the ReLU), `cifar_stem`
(conv1 becomes 3x3 stride 1 with no pool after it, so 32x32 inputs reach fc6 as 7x7x256 in both
layouts, before the torchvision layout's adaptive pool), `width` (all conv and hidden fc
widths), `dropout`, `dtype`, `conv_general_dilated`.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from cnn_arch.models import common

# (features, kernel, stride, padding) of conv1..conv5, and the stages followed by a 3/2 max pool.
_CONVS = {
    'paper': ((96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)),
    'torchvision': ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1),
                    (256, 3, 1, 1)),
}
_POOLED = (0, 1, 4)
_HIDDEN = 4096
_FC6_GRID = 6  # spatial size fc6 sees (paper layout: fixed; torchvision: the adaptive pool)


class AlexNet(nn.Module):
  """AlexNet in the `'paper'` or `'torchvision'` layout (see the module docstring)."""
  num_classes: int = 1000
  layout: str = 'paper'
  norm: str = 'none'
  bn_axis_name: str | None = None
  cifar_stem: bool = False
  width: float = 1.0
  dropout: float = 0.5
  dtype: Any = jnp.float32
  conv_general_dilated: Callable | None = None

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ('stem',) + tuple(f'stage{i}' for i in range(1, 7)) + (common.HEAD,)

  @property
  def min_size(self) -> int:
    """Smallest input side: the paper layout needs a 6x6 (cifar: 7x7) map before fc6."""
    if self.layout == 'paper':
      return 32 if self.cifar_stem else 227
    return 7 if self.cifar_stem else 63

  @nn.compact
  def __call__(self, x, train: bool = False, frozen: int = 0, features: bool = False,
               start: int = 0):
    if self.layout not in _CONVS:
      raise ValueError(f'Unknown AlexNet layout {self.layout!r}; choose one of {tuple(_CONVS)}.')
    if not start:
      common.check_input(x, self.min_size, f'AlexNet ({self.layout} layout)')
    conv = functools.partial(common.conv, dtype=self.dtype,
                             conv_general_dilated=self.conv_general_dilated)
    norm = functools.partial(common.norm, self.norm, dtype=self.dtype,
                             axis_name=self.bn_axis_name)
    dense = functools.partial(common.dense, dtype=self.dtype)
    stages = [(name, self._conv_stage(i, name, conv, norm))
              for i, name in enumerate(self.stage_names[:5])]
    hidden = common.scaled(_HIDDEN, self.width)
    for i, name in ((6, 'stage5'), (7, 'stage6')):
      fc = common.DenseStage(hidden, f'fc{i}', dense, dropout=self.dropout,
                             dropout_first=self.layout == 'torchvision', name=name)
      stages.append((name, self._before_fc6(fc) if i == 6 else fc))
    x, feats = common.run_stages(stages, x, train=train, frozen=frozen, start=start)
    logits = dense(self.num_classes, name=common.HEAD)(x)
    return common.finish(common.upcast(logits), feats, x, features)

  def _conv_stage(self, i: int, name: str, conv: Callable, norm: Callable) -> common.ConvStack:
    features, kernel, stride, padding = _CONVS[self.layout][i]
    if i == 0 and self.cifar_stem:
      kernel, stride, padding = 3, 1, 1
    pooled = i in _POOLED and not (i == 0 and self.cifar_stem)
    layer = (f'conv{i + 1}', common.scaled(features, self.width), kernel, stride, padding)
    return common.ConvStack((layer,), conv, norm, pool=(3, 2) if pooled else None, name=name)

  def _before_fc6(self, fc6: Callable) -> Callable:
    """The adaptive pool (torchvision) or the fixed-size check (paper) in front of fc6."""
    grid = _FC6_GRID + (1 if self.cifar_stem else 0)

    def stage5(x, train):
      if self.layout == 'torchvision':
        x = common.adaptive_avg_pool(x, _FC6_GRID)
      elif x.shape[1:3] != (grid, grid):
        raise ValueError(
            f'AlexNet (paper layout) flattens a {grid}x{grid} map into fc6 but this input gives '
            f'{x.shape[1]}x{x.shape[2]}; feed {self.min_size}x{self.min_size} images, or use '
            'alexnet_tv (adaptive pooling) for other sizes.')
      return fc6(x, train)
    return stage5


AlexNetTV = functools.partial(AlexNet, layout='torchvision')
