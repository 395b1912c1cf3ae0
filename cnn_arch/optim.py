"""Optimisers and learning-rate schedules from optax, built from the `optim` config section.

SGD with momentum is what the CNN papers train with (Krizhevsky et al. 2012; He et al. 2016);
AdamW (Loshchilov & Hutter 2019) is the usual choice for fine-tuning heads. Weight decay applies
to convolution and dense kernels only, as in torchvision's reference recipes.

The optimizer of one phase of a fine-tuning plan (`cnn_arch.finetune`) is an
`optax.multi_transform` with one label per top-level parameter key: a trained key gets its own
momentum/Adam transformation scaled by its learning-rate multiplier, a frozen one `set_to_zero`
(no state, no weight decay). The schedule is applied once, after the partition, so its step count
is the run's and every stage sees the same schedule however late it is unfrozen; and a phase
change keeps the state of every key that stays trained (`carry_over`).
"""

import jax
import numpy as np
import optax
from ml_collections import ConfigDict

from cnn_arch.config import OPTIMIZERS, SCHEDULES
from cnn_arch.finetune import FROZEN, Plan


def schedule(cfg: ConfigDict, steps_per_epoch: int, total_steps: int, peak: float | None = None):
  """Linear warm-up, then cosine decay to 0, step decay by `step_factor`, or constant, from
  `peak` (default `cfg.learning_rate`)."""
  peak = cfg.learning_rate if peak is None else peak
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  if cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, max(total_steps - warmup, 1))
  elif cfg.schedule == 'step':
    main = optax.piecewise_constant_schedule(
        peak, {int(e * steps_per_epoch) - warmup: cfg.step_factor for e in cfg.step_epochs})
  elif cfg.schedule == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f'Unknown optim.schedule {cfg.schedule!r}; choose one of {SCHEDULES}.')
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _kernels(params):
  """True for convolution/dense kernels: the leaves weight decay applies to."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def _direction(cfg: ConfigDict, lr_mult: float) -> optax.GradientTransformation:
  """SGD (L2 decay added to the gradient, as torch.optim.SGD) or AdamW (decoupled decay), up
  to the scheduled learning rate: optax.sgd and optax.adamw with their last step factored out."""
  if cfg.name == 'sgd':
    momentum = optax.trace(cfg.momentum, cfg.nesterov) if cfg.momentum else optax.identity()
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_kernels), momentum,
                       optax.scale(lr_mult))
  if cfg.name == 'adamw':
    return optax.chain(optax.scale_by_adam(cfg.b1, cfg.b2),
                       optax.add_decayed_weights(cfg.weight_decay, mask=_kernels),
                       optax.scale(lr_mult))
  raise ValueError(f'Unknown optim.name {cfg.name!r}; choose one of {OPTIMIZERS}.')


def make(cfg: ConfigDict, plan: Plan, params, phase: int, steps_per_epoch: int,
         total_steps: int) -> optax.GradientTransformation:
  """The optimizer of `phase`: one transformation per trained key, frozen leaves untouched."""
  frozen = plan.frozen_keys(phase)
  transforms = {FROZEN: optax.set_to_zero()}
  transforms.update({k: _direction(cfg, plan.key_lr_mult(k)) for k in params if k not in frozen})
  # The schedule's shape is compiled in, its peak is a value of the optimizer state: runs that
  # differ only in the learning rate (a learning-rate grid) share one compiled step.
  tx = optax.chain(optax.multi_transform(transforms, plan.labels(params, phase)),
                   optax.scale_by_schedule(schedule(cfg, steps_per_epoch, total_steps, peak=1.0)),
                   optax.inject_hyperparams(optax.scale_by_learning_rate)(
                       learning_rate=cfg.learning_rate))
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx


def carry_over(old_state, new_state):
  """`new_state` (a fresh init of the next phase's optimizer) with the old state of every key
  that both phases train, and the old step count of the schedule."""
  def take(old, new):
    if isinstance(new, optax.MultiTransformState):
      return new._replace(inner_states={k: old.inner_states.get(k, v)
                                        for k, v in new.inner_states.items()})
    if isinstance(new, tuple) and not hasattr(new, '_fields'):
      return tuple(take(o, n) for o, n in zip(old, new))
    return old  # the schedule's count and the stateless transformations
  return take(old_state, new_state)


_MOMENTS = ('trace', 'mu', 'nu')  # optax's momentum and Adam moment fields


def _names(path) -> tuple:
  return tuple(getattr(p, 'key', getattr(p, 'name', getattr(p, 'idx', None))) for p in path)


def from_legacy(raw, abstract, learning_rate: float):
  """An optimizer state saved in an earlier layout (one transformation per 'frozen' /
  'backbone' / 'head' label, each with its own schedule count; or the schedule with its peak
  compiled in), as a tree like `abstract`, the current layout: every moment found by its field
  and parameter path, every count from the head's (all labels counted the same steps), the
  peak learning rate from the config (a workdir refuses a changed config)."""
  moments, count = {}, None
  for path, value in jax.tree_util.tree_flatten_with_path(raw)[0]:
    names = _names(path)
    field = next((f for f in _MOMENTS if f in names), None)
    if field:
      moments[(field,) + names[names.index(field) + 1:]] = value
    elif names[-1] == 'count' and (count is None or 'head' in names):
      count = value
  if count is None:
    raise ValueError('The checkpoint\'s optimizer state has no step count: it is not one this '
                     'project wrote. Fix: start a fresh workdir.')

  def fill(path, leaf):
    names = _names(path)
    field = next((f for f in _MOMENTS if f in names), None)
    key = (field,) + names[names.index(field) + 1:] if field else None
    if key in moments:
      return moments[key]
    if names[-1] == 'count':
      return count
    if 'hyperparams' in names and names[-1] == 'learning_rate':
      return np.asarray(learning_rate, leaf.dtype)
    raise ValueError(f'The checkpoint\'s optimizer state has no {jax.tree_util.keystr(path)}: '
                     'it was written for another optimizer. Fix: resume with the optimizer '
                     'settings it was written with, or start a fresh workdir.')
  return jax.tree_util.tree_map_with_path(fill, abstract)
