"""Checkpoints through orbax's CheckpointManager, one layout for training runs and imported weights.

A checkpoint directory (a run's `WORKDIR/checkpoints`, or what `cnn_arch.convert` writes) holds
numbered steps, each with three items:
  * `variables`: `{'params': ..., 'batch_stats': ...}`, what `init_from` fine-tunes from;
  * `train`: optimizer state, step, RNG key and data position (runs only; absent after import);
  * `meta`: JSON naming the model, its options and class count, so a mismatch fails early.
Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save never leaves a step that `latest_step()` would pick up.
"""

import errno
import logging
import os
import shutil
import threading
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from cnn_arch import optim


def _registry() -> ocp.DefaultCheckpointHandlerRegistry:
  """The handler of each item, for saving and restoring: arrays (orbax's standard PyTree
  handler) for `variables` and `train`, JSON for `meta`."""
  registry = ocp.DefaultCheckpointHandlerRegistry()
  for item, handler, save, restore in (
      ('variables', ocp.StandardCheckpointHandler(), ocp.args.StandardSave,
       ocp.args.StandardRestore),
      ('train', ocp.StandardCheckpointHandler(), ocp.args.StandardSave, ocp.args.StandardRestore),
      ('meta', ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore)):
    registry.add(item, save, handler)
    registry.add(item, restore, handler)
  return registry


def manager(directory: str, *, keep: int | None = None, best_metric: str | None = None,
            keep_best: int | None = None) -> ocp.CheckpointManager:
  """A CheckpointManager keeping the last `keep` steps (all if None), or, with `best_metric`,
  the best `keep_best` by that metric (higher is better)."""
  best = best_metric is not None and keep_best
  metric = (lambda m: m[best_metric]) if best else None
  policy = (ocp_managers.BestN(get_metric_fn=metric, n=keep_best) if best else
            ocp_managers.LatestN(keep))
  options = ocp.CheckpointManagerOptions(
      best_fn=metric, best_mode='max', preservation_policy=policy, create=True,
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               handler_registry=_registry())


def resolve(path: str) -> str:
  """Accepts a run's workdir or a checkpoint directory; returns the checkpoint directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'No checkpoint at {path}: give finetune.init_from a run\'s workdir or a directory '
        'written by `python -m cnn_arch.convert`.')
  return path


def save_pretrained(directory: str, variables: dict, meta: dict, step: int = 0):
  """Writes `variables` and `meta` as one step of a checkpoint directory (used by convert)."""
  with manager(directory) as mngr:
    mngr.save(step, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def load_pretrained(path: str, step: int | None = None) -> tuple[dict, dict[str, Any]]:
  """Restores `(variables, meta)` from the latest (or given) step of a checkpoint directory.

  The arrays land on this process's first device, whatever devices wrote them (8 GPUs, a pod
  slice): orbax would otherwise insist on the saving topology.
  """
  directory = resolve(path)
  with ocp.CheckpointManager(directory, handler_registry=_registry()) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{directory} holds no complete checkpoint step.')
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          mngr.item_metadata(step)['variables'])
    restored = mngr.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  return dict(restored['variables']), dict(restored['meta'])


def save_state(mngr: ocp.CheckpointManager, step: int, variables: dict, train: dict,
               meta: dict, metrics: dict | None = None):
  """Saves one training step: variables, optimizer state/step/RNG, and JSON metadata.

  A save that fails for want of space waits for the writer threads it started (they go on
  writing other arrays after the first failure), removes the partial step and raises an OSError
  that says so; the steps saved before it are untouched (orbax renames a step into place only
  when whole).
  """
  threads = set(threading.enumerate())
  try:
    mngr.save(step, metrics=metrics, args=ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(meta)))
  except Exception as e:  # tensorstore reports ENOSPC as a ValueError or an OSError
    if not _out_of_space(e):
      raise
    directory = str(mngr.directory)
    for thread in set(threading.enumerate()) - threads:
      try:
        thread.join(timeout=60)
      except Exception:  # pylint: disable=broad-except  # orbax's threads re-raise their ENOSPC
        pass
    for name in os.listdir(directory):
      if name.startswith(f'{step}.') and 'tmp' in name:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    kept = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    raise OSError(errno.ENOSPC, f'No space left on the device while saving checkpoint step '
                  f'{step} in {directory}; the checkpoints already there (steps {kept}) are '
                  'intact. Free space or use a --workdir on a larger disk, then run the same '
                  'command to resume.') from e


def _out_of_space(e: BaseException | None) -> bool:
  while e is not None:
    if getattr(e, 'errno', None) == errno.ENOSPC or 'No space left' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def restore_state(mngr: ocp.CheckpointManager, step: int, variables: Any, train: Any,
                  learning_rate: float):
  """Restores `(variables, train, meta)` of `step` into the given abstract (sharded) trees.

  A train item written in an optimizer layout of `optim.from_legacy` is converted to `train`'s
  (`learning_rate`: the config's, which that layout did not store).
  """
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        variables=ocp.args.StandardRestore(variables), train=ocp.args.StandardRestore(train),
        meta=ocp.args.JsonRestore()))
    return restored['variables'], restored['train'], restored['meta']
  except ValueError as e:
    if 'tree structures do not match' not in str(e):
      raise
  restored = mngr.restore(step, args=ocp.args.Composite(
      variables=ocp.args.StandardRestore(variables), train=ocp.args.StandardRestore(),
      meta=ocp.args.JsonRestore()))
  raw = restored['train']
  opt_state = optim.from_legacy(raw['opt_state'], train['opt_state'], learning_rate)
  place = lambda x, like: jax.device_put(np.asarray(x), like.sharding)
  converted = {'step': place(raw['step'], train['step']), 'rng': place(raw['rng'], train['rng']),
               'opt_state': jax.tree.map(place, opt_state, train['opt_state'])}
  return restored['variables'], converted, restored['meta']


def restore_latest(mngr: ocp.CheckpointManager, variables: Any, train: Any,
                   learning_rate: float):
  """`(step, variables, train)` of the newest readable step, or None if there is none.

  `train` is the abstract train state, or a function of the step that gives it (the optimizer
  state of a fine-tuning phase has that phase's shape); `learning_rate` as in `restore_state`.

  A step that fails to read (a disk error, a file deleted by hand) is reported and moved to
  `<directory>.unreadable/` for inspection, so the run can write that step again; the one before
  it is tried next.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored_variables, restored_train, _ = restore_state(
          mngr, step, variables, train(step) if callable(train) else train, learning_rate)
      return step, restored_variables, restored_train
    except Exception as e:  # orbax raises many types (ValueError, FileNotFoundError, ...)
      aside = _set_aside(mngr, step)
      logging.warning('Checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and '
                      'trying the one before it.', step, mngr.directory, type(e).__name__, e,
                      aside)
  return None


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  aside = os.path.join(f'{mngr.directory}.unreadable', f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    os.rename(os.path.join(mngr.directory, str(step)), aside)
  if jax.process_count() > 1:  # every host sees it gone before any saves that step again
    multihost_utils.sync_global_devices(f'checkpoint: step {step} set aside')
  mngr.reload()
  return aside
