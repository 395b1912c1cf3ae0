"""Imports torchvision's ImageNet weights into the cnn_arch models.

`load_torchvision('resnet50', 'resnet50-0676ba61.pth')` returns `(model, variables)` such that
`model.apply(variables, x_nhwc, train=False)` gives torchvision's eval-mode logits for the same
images in NCHW. The state dict is read from a .pth (needs PyTorch), a .safetensors or .npz file
(numpy only), or an in-memory mapping of names to arrays.

Each family names, for every Flax module path, the torchvision module it takes its weights from
(`tv_names`); the leaf conversions are shared:
  * convolution kernels OIHW -> HWIO (a grouped kernel (O, I/g, kh, kw) -> (kh, kw, I/g, O));
  * Linear (out, in) -> Dense (in, out); a Linear fed by `torch.flatten` of an NCHW map (AlexNet
    and VGG fc6, GoogLeNet's auxiliary fc1) also has its input rows reordered from (C, H, W) to
    the (H, W, C) order in which an NHWC map flattens;
  * BatchNorm weight, bias, running_mean, running_var -> scale, bias, mean, var (the epsilon
    lives in the model: 1e-5, GoogLeNet 1e-3); `num_batches_tracked` is ignored.
Every key must be used and every shape must fit, else a ValueError names the offending keys.
"""

import dataclasses
import os
import re
from typing import Any, Callable, Mapping

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from cnn_arch import models

TORCH_HINT = ('Reading a .pth file needs PyTorch: `pip install torch` (CPU wheels suffice), or '
              'convert it on a machine that has PyTorch with `safetensors.torch.save_file('
              'torch.load(path), "weights.safetensors")` and pass the .safetensors (or a .npz) '
              'instead.')

# (collection, Flax leaf name) -> torchvision parameter or buffer name.
_LEAVES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
           ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
           ('batch_stats', 'var'): 'running_var'}
_IGNORED = ('num_batches_tracked',)
_SHOWN = 5  # offending keys listed per kind of mismatch


@dataclasses.dataclass(frozen=True)
class Family:
  """How one torchvision architecture maps onto a registered cnn_arch model.

  Attributes:
    model: the registered cnn_arch name.
    tv_names: Flax module path ('stage1/block0/conv1') -> torchvision module ('layer1.0.conv1').
    head: torchvision's classifier module, whose rows give the class count.
    chw_flatten: torchvision Linear -> side of the square NCHW map `torch.flatten` feeds it.
    options: cnn_arch options that torchvision's pretrained model implies.
    options_from_state: further options read off the state dict itself.
    ignore: torchvision key prefixes the model may have no counterpart for.
  """
  model: str
  tv_names: Callable[[str], str]
  head: str
  chw_flatten: Mapping[str, int] = dataclasses.field(default_factory=dict)
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  ignore: tuple[str, ...] = ()
  options_from_state: Callable[[Mapping], dict] = lambda state: {}


def _alexnet_names(path: str) -> str:
  table = {'stem/conv1': 'features.0', 'stage1/conv2': 'features.3', 'stage2/conv3': 'features.6',
           'stage3/conv4': 'features.8', 'stage4/conv5': 'features.10',
           'stage5/fc6': 'classifier.1', 'stage6/fc7': 'classifier.4', 'head': 'classifier.6'}
  return table.get(path, path)


def _vgg_names(block_sizes: tuple[int, ...], bn: bool) -> Callable[[str], str]:
  """torchvision's `features` is one Sequential: conv[, bn], relu per layer, a pool per block."""
  per_conv = 3 if bn else 2
  starts = np.cumsum((0,) + tuple(n * per_conv + 1 for n in block_sizes))
  blocks = ('stem', 'stage1', 'stage2', 'stage3', 'stage4')
  table = {'stage5/fc6': 'classifier.0', 'stage6/fc7': 'classifier.3', 'head': 'classifier.6'}

  def names(path: str) -> str:
    m = re.fullmatch(r'(\w+)/(conv|bn)(\d+)', path)
    if not m or m[1] not in blocks:
      return table.get(path, path)
    index = starts[blocks.index(m[1])] + (int(m[3]) - 1) * per_conv + (m[2] == 'bn')
    return f'features.{index}'
  return names


def _resnet_names(path: str) -> str:
  path = re.sub(r'^stem/', '', path)
  path = re.sub(r'^stage(\d)/block(\d+)/', r'layer\1.\2.', path)
  path = path.replace('downsample_conv', 'downsample.0').replace('downsample_bn', 'downsample.1')
  return 'fc' if path == 'head' else path.replace('/', '.')


def _googlenet_names(path: str) -> str:
  path = re.sub(r'^(stem|stage\d)/', '', path)
  path = re.sub(r'/branch(\d)_(\d)/', r'/branch\1.\2/', path)
  return 'fc' if path == 'head' else path.replace('/', '.')


_VGG_BLOCKS = {'vgg11': (1, 1, 2, 2, 2), 'vgg13': (2, 2, 2, 2, 2), 'vgg16': (2, 2, 3, 3, 3),
               'vgg19': (2, 2, 4, 4, 4)}

FAMILIES: dict[str, Family] = {
    'alexnet': Family('alexnet_tv', _alexnet_names, 'classifier.6', {'classifier.1': 6}),
    **{f'{n}{s}': Family(f'{n}{s}', _vgg_names(blocks, bool(s)), 'classifier.6',
                         {'classifier.0': 7})
       for n, blocks in _VGG_BLOCKS.items() for s in ('', '_bn')},
    # torchvision's pretrained GoogLeNet re-normalises its input (transform_input); its file
    # also holds the auxiliary classifiers, imported when the model has them (aux_logits).
    'googlenet': Family('googlenet', _googlenet_names, 'fc', {'aux1.fc1': 4, 'aux2.fc1': 4},
                        {'transform_input': True}, ignore=('aux1.', 'aux2.'),
                        options_from_state=lambda s: {'aux_logits': 'aux1.fc2.weight' in s}),
    **{n: Family(n, _resnet_names, 'fc')
       for n in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
                 'resnext50_32x4d', 'resnext101_32x8d')},
}


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Reads a state dict from a mapping, or a .pth, .safetensors or .npz file, as float32 numpy."""
  if isinstance(source, Mapping):
    raw = dict(source)
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'No weights file at {path}.')
    if path.endswith('.safetensors'):
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
      raw = load_file(path)
    elif path.endswith('.npz'):
      with np.load(path) as npz:
        raw = {k: npz[k] for k in npz.files}
    elif path.endswith(('.pth', '.pt', '.bin')):
      raw = _read_pth(path)
    else:
      raise ValueError(f'Cannot tell the format of {path}: give a .pth, .safetensors or .npz '
                       'file, or a mapping of names to arrays.')
  return {k: _to_numpy(v) for k, v in raw.items()}


def _read_pth(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Cannot read {path}. {TORCH_HINT}') from e
  state = torch.load(path, map_location='cpu', weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(f'{path} holds a {type(state).__name__}, not a state dict; save '
                     '`model.state_dict()` rather than the model.')
  return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor, without importing torch
    value = value.detach().cpu().numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def load_torchvision(name: str, source, *, num_classes: int | None = None, **options):
  """Builds the cnn_arch model for torchvision's `name` and converts `source`'s weights.

  Args:
    name: torchvision's model name ('alexnet', 'vgg16_bn', 'googlenet', 'resnet50', ...).
    source: a .pth / .safetensors / .npz path, or a mapping of state dict names to arrays.
    num_classes: classifier outputs; by default read from the state dict's classifier.
    **options: further options of the cnn_arch model (e.g. `width` for reduced models).

  Returns:
    `(model, variables)`, variables being `{'params': ..., 'batch_stats': ...}` (the latter
    empty for models without BatchNorm).
  """
  model, variables, _ = convert_torchvision(name, source, num_classes=num_classes, **options)
  return model, variables


def convert_torchvision(name: str, source, *, num_classes: int | None = None, **options):
  """Like `load_torchvision`, returning `(model, variables, meta)`: `meta` is what
  `checkpoint.save_pretrained` records (registered model, options, class count, source)."""
  family = _family(name)
  state = read_state_dict(source)
  if num_classes is None:
    head = state.get(family.head + '.weight')
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 1000
  options = {**family.options, **family.options_from_state(state), **options}
  model, layout = _layout(family, num_classes, options)
  variables = _convert_state(name, family, state, layout)
  meta = {'model': family.model, 'options': options, 'num_classes': num_classes,
          'source': f'torchvision:{name}'}
  return model, variables, meta


def expected_keys(name: str, *, num_classes: int = 1000, **options) -> dict[str, tuple]:
  """The torchvision state dict keys and shapes that `load_torchvision(name, ...)` reads."""
  family = _family(name)
  _, layout = _layout(family, num_classes, {**family.options, **options})
  return dict(layout.values())


def _family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f'No torchvision mapping for {name!r}; valid names: '
                     f'{", ".join(FAMILIES)}.')
  return FAMILIES[name]


def _layout(family: Family, num_classes: int, options: dict):
  """The model, and each of its variables' path -> (torchvision key, torchvision shape)."""
  model = models.get_model(family.model, num_classes=num_classes, **options)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 224, 224, 3), jnp.float32), train=False))
  flat = traverse_util.flatten_dict(
      {c: dict(shapes.get(c, {})) for c in ('params', 'batch_stats')})
  layout = {path: (_torch_key(family, path), _torch_shape(leaf.shape))
            for path, leaf in flat.items()}
  if len({key for key, _ in layout.values()}) < len(layout):
    raise RuntimeError(f'The {family.model} mapping sends two variables to one torchvision key.')
  return model, layout


def _convert_state(name: str, family: Family, state: Mapping[str, np.ndarray],
                   layout: dict) -> dict:
  """Fills the variable tree `layout` describes from `state`, or names every mismatch."""
  wanted = {key: (path, shape) for path, (key, shape) in layout.items()}
  missing = [f'{key} {shape}' for key, (_, shape) in wanted.items() if key not in state]
  wrong, unexpected, out = [], [], {}
  for key, array in state.items():  # in the source's (torchvision's module) order
    if key not in wanted:
      if not _ignored(key, family):
        unexpected.append(f'{key} {tuple(array.shape)}')
    elif array.shape != wanted[key][1]:
      wrong.append(f'{key}: source {tuple(array.shape)}, model {wanted[key][1]} '
                   f'(for {"/".join(wanted[key][0])})')
    else:
      out[wanted[key][0]] = jnp.asarray(_to_flax(array, key, family))
  if missing or wrong or unexpected:
    raise ValueError(_mismatch_message(name, family, missing, wrong, unexpected))
  variables = traverse_util.unflatten_dict(out)
  variables.setdefault('batch_stats', {})
  return variables


def _torch_key(family: Family, path: tuple[str, ...]) -> str:
  collection, *modules, leaf = path
  return f'{family.tv_names("/".join(modules))}.{_LEAVES[collection, leaf]}'


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax(array: np.ndarray, key: str, family: Family) -> np.ndarray:
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    side = family.chw_flatten.get(key.rsplit('.', 1)[0])
    if side:  # rows of an NCHW flatten: (C, H, W) -> (H, W, C)
      out, n = array.shape
      array = array.reshape(out, n // side**2, side, side).transpose(0, 2, 3, 1).reshape(out, n)
    return array.T
  return array


def _ignored(key: str, family: Family) -> bool:
  return key.rsplit('.', 1)[-1] in _IGNORED or key.startswith(family.ignore)


def _mismatch_message(name, family, missing, wrong, unexpected) -> str:
  parts = [f'The state dict does not fit torchvision {name} (cnn_arch model {family.model!r}).']
  for label, items in (('missing', missing), ('wrong shape', wrong),
                       ('unexpected', unexpected)):
    if items:
      more = f', ... ({len(items) - _SHOWN} more)' if len(items) > _SHOWN else ''
      parts.append(f'{len(items)} {label}: {"; ".join(items[:_SHOWN])}{more}.')
  parts.append('Check that the file is a state dict of this architecture (and pass the '
               'matching name), and that options such as num_classes or width agree with it.')
  return ' '.join(parts)

