"""The model registry: every architecture by name, built through `get_model`.

Each model is a Flax Linen module called as
`model.apply(variables, images_nhwc, train=False, frozen=0, features=False, start=0)` (see
`common`), and has a `stage_names` property: `('stem', 'stage1', ..., 'head')`, exactly the
top-level keys of `params` that freezing and weight import key on (the one exception: GoogLeNet
with `aux_logits=True` adds 'aux1' and 'aux2', which its `attached_heads` maps to 'stage2'), and
a `min_size` property, the smallest input side it accepts. `model_options(name)` lists the
keyword options `get_model` accepts for a name.
"""

import ast
import dataclasses
import difflib
import functools

import flax
import jax

from cnn_arch.models import alexnet, inception, resnet, vgg

MODELS = {
    'alexnet': alexnet.AlexNet,
    'alexnet_tv': alexnet.AlexNetTV,
    'vgg11': vgg.VGG11, 'vgg13': vgg.VGG13, 'vgg16': vgg.VGG16, 'vgg19': vgg.VGG19,
    'vgg11_bn': vgg.VGG11BN, 'vgg13_bn': vgg.VGG13BN, 'vgg16_bn': vgg.VGG16BN,
    'vgg19_bn': vgg.VGG19BN,
    'googlenet': inception.GoogLeNet,
    'resnet18': resnet.ResNet18, 'resnet34': resnet.ResNet34, 'resnet50': resnet.ResNet50,
    'resnet101': resnet.ResNet101, 'resnet152': resnet.ResNet152,
    'resnext50_32x4d': resnet.ResNeXt50_32x4d, 'resnext101_32x8d': resnet.ResNeXt101_32x8d,
}


def get_model(name: str, num_classes: int = 1000, **options):
  """Builds the registered model `name` with `num_classes` outputs and family options."""
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(f'Unknown model {name!r}.{hint} Valid names: {", ".join(MODELS)}.')
  unknown = sorted(set(options) - set(model_options(name)))
  if unknown:
    fixed = [o for o in unknown if o in _fixed(name)]
    note = f' ({", ".join(fixed)} fixed by the name {name!r})' if fixed else ''
    raise ValueError(f'Unknown option(s) {", ".join(unknown)} for model {name!r}{note}. Valid '
                     f'options: {", ".join(model_options(name))}.')
  return MODELS[name](num_classes=num_classes, **options)


def parse_option(text: str) -> tuple[str, object]:
  """'width=0.5' -> ('width', 0.5): a command-line model option; values are Python literals,
  else kept as strings (norm=batch)."""
  key, sep, value = text.partition('=')
  if not sep or not key:
    raise ValueError(f'--option takes KEY=VALUE, got {text!r}; e.g. --option width=0.5.')
  try:
    return key, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key, value


def model_options(name: str) -> tuple[str, ...]:
  """The keyword options `get_model(name, ...)` accepts besides `num_classes`."""
  ctor = MODELS[name]
  cls = ctor.func if isinstance(ctor, functools.partial) else ctor
  return tuple(f.name for f in dataclasses.fields(cls)
               if f.name not in ('parent', 'name', 'num_classes') and f.name not in _fixed(name))


def _fixed(name: str) -> dict:
  """Options the registered name binds (depth, block type, 'batch' for `_bn`, ...)."""
  ctor = MODELS[name]
  return ctor.keywords if isinstance(ctor, functools.partial) else {}


def init_variables(model, image_size: int, rng) -> dict:
  """`model.init` on one NHWC image of `image_size`, returning plain nested dicts.

  Compiled without XLA's backend optimisations: initialisation runs once, and the optimised
  compile of the random initialisers alone is several times slower (docs/performance.md).
  """
  x = jax.numpy.zeros((1, image_size, image_size, 3), jax.numpy.float32)
  init = jax.jit(functools.partial(model.init, train=False))
  compiled = init.lower({'params': rng, 'dropout': rng}, x).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return flax.core.unfreeze(compiled({'params': rng, 'dropout': rng}, x))
