"""Everything a run decides before compiling: model, dataset view, mesh, fine-tuning plan, optimizer.

Each check here is cheap and runs before the first compile, so a bad config fails in seconds
with a message naming the problem and the fix.
"""

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from cnn_arch import checkpoint, feature_cache, finetune, input_pipeline, models, optim
from cnn_arch.config import DTYPES, validate

AXIS = 'batch'


@dataclasses.dataclass
class Setup:
  model: Any
  model_meta: dict  # what a checkpoint records to identify the architecture
  info: Any  # input_pipeline.DatasetInfo
  image_size: int
  mesh: Any
  batch_sharding: Any
  replicated: Any
  stage_names: tuple
  plan: finetune.Plan
  optimizers: tuple  # one optax transformation per phase of the plan
  steps_per_epoch: int
  total_steps: int
  cache_stages: int = 0  # stages whose outputs the trainer caches (`cnn_arch.feature_cache`)
  cache_bytes: int = 0  # their estimated host memory


def build_model(config: ConfigDict, num_classes: int):
  """The registered model with the config's options and compute dtype."""
  if config.model.dtype not in DTYPES:
    raise ValueError(f'model.dtype {config.model.dtype!r} is not one of {DTYPES}.')
  if config.model.dtype == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError("model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 in the "
                     'environment (float64 is for numerics checks; train in float32).')
  options = dict(config.model.options)
  if not config.model.bn_group_size:  # BatchNorm statistics of the global batch, on any devices
    options['bn_axis_name'] = AXIS
  if config.model.dtype != 'float32':
    options['dtype'] = jnp.dtype(config.model.dtype)
  return models.get_model(config.model.name, num_classes=num_classes, **options)


def check_batch(batch_size: int, what: str):
  n, hosts = jax.device_count(), jax.process_count()
  if batch_size % n or batch_size % hosts:
    raise ValueError(
        f'{what} {batch_size} does not divide over {n} devices on {hosts} host(s); use a '
        f'multiple of {n} (e.g. {max(n, batch_size // n * n) or n}).')


def check_bn_groups(config: ConfigDict, has_batch_norm: bool):
  """Ghost BatchNorm needs BatchNorm, and groups that tile each device's share of the batch."""
  g = config.model.bn_group_size
  if not g:
    return
  if not has_batch_norm:
    raise ValueError(f'Config value model.bn_group_size={g} needs BatchNorm, but model '
                     f'{config.model.name} with options {dict(config.model.options)} has none. '
                     'Fix: set model.bn_group_size=0 or model.options.norm=batch.')
  per_device = config.train.batch_size // jax.device_count()
  if per_device % g:
    raise ValueError(f'Config value model.bn_group_size={g} does not divide the '
                     f'{per_device} examples of train.batch_size={config.train.batch_size} on '
                     f'each of {jax.device_count()} devices. Fix: use a divisor of {per_device}.')


@functools.lru_cache(maxsize=64)
def variable_shapes(model, image_size: int, x64: bool) -> dict:
  """The model's variables as shapes, traced once per (model, input size, precision mode): a
  sweep of many short runs would otherwise trace `model.init` for each (0.4 s for a ResNet-18)."""
  del x64  # part of the cache key: it changes the traced dtypes
  return jax.eval_shape(
      lambda: model.init({'params': jax.random.PRNGKey(0)},
                         jnp.zeros((1, image_size, image_size, 3)), train=False))


def make_setup(config: ConfigDict) -> Setup:
  """Validates `config` against the model and data, and builds the static pieces of a run."""
  validate(config)
  info = input_pipeline.get_info(config.data)
  num_classes = config.model.num_classes or info.num_classes
  if num_classes < info.num_classes:
    raise ValueError(f'model.num_classes={num_classes} but the dataset view has '
                     f'{info.num_classes} classes; set model.num_classes to 0 to follow it.')
  model = build_model(config, num_classes)
  stage_names = tuple(model.stage_names)
  for name, value in (('train.batch_size', config.train.batch_size),
                      ('train.eval_batch_size', config.train.eval_batch_size)):
    check_batch(value, name)
  steps_per_epoch = input_pipeline.steps_per_epoch(info, config.train.batch_size)
  if steps_per_epoch < 1:
    raise ValueError(f'train.batch_size {config.train.batch_size} is larger than the '
                     f'{info.num_train} training examples; lower it.')
  total_steps = max(1, int(round(config.train.num_epochs * steps_per_epoch)))
  image_size = info.image_size
  shapes = variable_shapes(model, image_size, jax.config.jax_enable_x64)
  check_bn_groups(config, 'batch_stats' in shapes)
  plan = finetune.make_plan(config, stage_names, getattr(model, 'attached_heads', None),
                            steps_per_epoch, total_steps)
  params = dict(shapes['params'])
  optimizers = tuple(optim.make(config.optim, plan, params, i, steps_per_epoch, total_steps)
                     for i in range(len(plan.phases)))
  cache_stages, cache_bytes = feature_cache.plan(config, model, info, plan)
  mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
  return Setup(model=model, model_meta=dict(model=config.model.name,
                                            options=_plain(config.model.options.to_dict()),
                                            num_classes=num_classes),
               info=info, image_size=image_size, mesh=mesh,
               batch_sharding=NamedSharding(mesh, P(AXIS)), replicated=NamedSharding(mesh, P()),
               stage_names=stage_names, plan=plan, optimizers=optimizers, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               cache_stages=cache_stages, cache_bytes=cache_bytes)


def _plain(options: dict) -> dict:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def load_init_from(s: Setup, path: str, fresh: dict, loaded: tuple | None = None) -> dict:
  """`fresh` variables with every stage replaced by the checkpoint's, except a resized head and
  the stages the plan re-initialises (`finetune.reinit_above`).

  The lecture's recipe: keep the pretrained backbone, "remove and replace [the last layer] with
  another randomly initialized layer" when the number of classes changes.
  """
  loaded, meta = loaded or checkpoint.load_pretrained(path)
  name = s.model_meta['model']
  if meta.get('model') != name:
    raise ValueError(f'finetune.init_from={path} holds a {meta.get("model")!r} network but '
                     f'model.name is {name!r}; set model.name={meta.get("model")} or point '
                     'init_from at a checkpoint of this architecture.')
  if meta.get('options', {}) != s.model_meta['options']:  # e.g. transform_input: no shape shows it
    logging.warning('finetune.init_from=%s was saved with model options %s; the config has %s.',
                    path, meta.get('options'), s.model_meta['options'])
  out = {}
  for collection, tree in fresh.items():
    source = loaded.get(collection, {})
    out[collection] = {}
    for key, sub in tree.items():
      if key not in source:
        raise ValueError(f'finetune.init_from={path} has no {collection}/{key}; it was '
                         f'written for options {meta.get("options")}, the config has '
                         f'{s.model_meta["options"]}.')
      is_head = key not in s.stage_names[:-1]  # the classifier and any auxiliary heads
      resized = is_head and meta.get('num_classes') != s.model_meta['num_classes']
      if resized or s.plan.stage_of(key) in s.plan.reinit:
        out[collection][key] = sub  # re-initialised
        continue
      mismatch = _mismatches(source[key], sub, f'{collection}/{key}')
      if mismatch:
        raise ValueError(f'finetune.init_from={path} does not fit model {name} with options '
                         f'{s.model_meta["options"]} (checkpoint options {meta.get("options")}):'
                         f' ' + '; '.join(mismatch[:5]) + f' ({len(mismatch)} in all).')
      out[collection][key] = jax.tree.map(jnp.asarray, source[key])
  return out


def _mismatches(source, target, prefix: str) -> list:
  """Paths whose presence or shape differ between two variable trees."""
  flat_s = {jax.tree_util.keystr(k): v.shape for k, v in
            jax.tree_util.tree_flatten_with_path(source)[0]}
  flat_t = {jax.tree_util.keystr(k): v.shape for k, v in
            jax.tree_util.tree_flatten_with_path(target)[0]}
  out = [f'{prefix}{k}: checkpoint {flat_s.get(k, "missing")} vs model {flat_t.get(k, "missing")}'
         for k in sorted(set(flat_s) | set(flat_t)) if flat_s.get(k) != flat_t.get(k)]
  return out
