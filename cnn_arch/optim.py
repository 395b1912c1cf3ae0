"""Optimisers and learning-rate schedules from optax, built from the `optim` config section.

SGD with momentum is what the CNN papers train with (Krizhevsky et al. 2012; He et al. 2016);
AdamW (Loshchilov & Hutter 2019) is the usual choice for fine-tuning heads. Weight decay applies
to convolution and dense kernels only, as in torchvision's reference recipes, and never to frozen
leaves: it sits inside the per-label transformations of `freeze.partition`.
"""

import jax
import optax
from ml_collections import ConfigDict

from cnn_arch import freeze
from cnn_arch.config import OPTIMIZERS, SCHEDULES


def schedule(cfg: ConfigDict, steps_per_epoch: int, total_steps: int, scale: float = 1.0):
  """Linear warm-up, then cosine decay to 0, step decay by `step_factor`, or constant."""
  peak = cfg.learning_rate * scale
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


def _transform(cfg: ConfigDict, lr) -> optax.GradientTransformation:
  """SGD (L2 decay added to the gradient, as torch.optim.SGD) or AdamW (decoupled decay)."""
  if cfg.name == 'sgd':
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=_kernels),
                       optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  if cfg.name == 'adamw':
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=_kernels)
  raise ValueError(f'Unknown optim.name {cfg.name!r}; choose one of {OPTIMIZERS}.')


def make(cfg: ConfigDict, param_labels, steps_per_epoch: int, total_steps: int):
  """The full optimizer: one transformation per freeze label, frozen leaves untouched."""
  transforms = {}
  for label, scale in (('head', 1.0), ('backbone', cfg.backbone_lr_mult)):
    lr = schedule(cfg, steps_per_epoch, total_steps, scale)
    transforms[label] = _transform(cfg, lr)
  tx = freeze.partition(transforms, param_labels)
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx
