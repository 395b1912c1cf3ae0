"""Training and fine-tuning: a data-parallel SPMD step over a device mesh, and the loop around it.

The step is the pmap model written with the current API: `jax.shard_map` over a one-axis mesh
of every device of every host runs one per-device program; gradients, BatchNorm statistics and
metrics are averaged over the named batch axis `AXIS`. The same code serves 1 CPU, 8 GPUs and
a multi-host pod. Fine-tuning follows the lecture: load a pretrained backbone, re-initialise the
head when the class count differs, freeze stages as the plan says (`cnn_arch.finetune`: a prefix,
any stages, or phases); with augmentation off, a prefix frozen throughout runs once and the steps
train on its cached outputs (`cnn_arch.feature_cache`).
"""

import collections
import dataclasses
import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from cnn_arch import (checkpoint, datasets, feature_cache, input_pipeline, models, optim,
                      reporting, rundir)
from cnn_arch.train_setup import AXIS, Setup, load_init_from, make_setup


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def cross_entropy(logits, labels, num_classes: int, smoothing: float):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return optax.softmax_cross_entropy(models.common.upcast(logits), targets)


def _keep_frozen(new: dict, old: dict, frozen_keys: tuple) -> dict:
  """Frozen subtrees come out of a step as the very same arrays, bit for bit."""
  return {k: old[k] if k in frozen_keys else v for k, v in new.items()}


def _apply_in_groups(apply, params, images, rng, group_size: int):
  """`apply(params, images, rng)` on groups of `group_size` examples, each normalised by its own
  batch statistics ("ghost" BatchNorm); the running statistics take the groups' mean."""
  if not group_size:
    return apply(params, images, rng)
  groups = images.shape[0] // group_size
  images = images.reshape((groups, group_size) + images.shape[1:])
  out, updated = jax.vmap(apply, in_axes=(None, 0, 0))(params, images,
                                                       jax.random.split(rng, groups))
  out = jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)
  return out, jax.tree.map(lambda y: y.mean(0), updated)


def train_step(state: TrainState, batch: dict, *, model, tx, frozen: tuple, frozen_keys: tuple,
               num_classes: int, smoothing: float, aux_weight: float, skip_nonfinite: bool,
               start: int = 0, bn_group_size: int = 0):
  """One SGD step on this device's share of the batch; collectives average over `AXIS`.

  `frozen`: the body stages the model runs frozen; `frozen_keys`: the top-level parameter keys
  kept bit-identical. `start=k`: batch['image'] holds the outputs of the first k stages (cached
  features). `bn_group_size=g`: BatchNorm statistics over groups of g examples.
  """
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), lax.axis_index(AXIS))

  def apply(params, images, rng):
    return model.apply({'params': params, 'batch_stats': state.batch_stats}, images, train=True,
                       frozen=frozen, start=start, mutable=['batch_stats'],
                       rngs={'dropout': rng})

  def loss_fn(params):
    # Frozen parameters are constants: no gradient is computed for them, even where the
    # backward pass runs through a frozen stage to a trained one below it.
    params = {k: lax.stop_gradient(v) if k in frozen_keys else v for k, v in params.items()}
    out, updated = _apply_in_groups(apply, params, batch['image'], rng, bn_group_size)
    logits, aux = out if isinstance(out, tuple) else (out, ())  # GoogLeNet's auxiliary heads
    # The global batch's mean loss. The parameters are replicated (invariant over AXIS), so
    # shard_map's transpose sums their per-device cotangents: differentiating this mean
    # averages the gradients over the batch axis, as pmap's explicit pmean(grads) did.
    ce = lambda z: cross_entropy(z, batch['label'], num_classes, smoothing).mean()
    loss = lax.pmean(ce(logits) + aux_weight * sum(ce(a) for a in aux), AXIS)
    return loss, (logits, updated.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  batch_stats = lax.pmean(batch_stats, AXIS)  # already equal under sync BN; makes it invariant
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = _keep_frozen(optax.apply_updates(state.params, updates), state.params, frozen_keys)
  batch_stats = _keep_frozen(batch_stats, state.batch_stats, frozen_keys)
  accuracy = (jnp.argmax(logits, -1) == batch['label']).mean()
  metrics = {'loss': loss, 'accuracy': lax.pmean(accuracy, AXIS)}
  # The update too: an infinite learning rate turns finite gradients into non-finite weights.
  finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(optax.tree.norm(grads))
            & jnp.isfinite(optax.tree.norm(updates)))
  new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                      opt_state=opt_state)
  if skip_nonfinite:  # keep the old parameters, but count the step so the data moves on
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    new = new.replace(step=state.step + 1)
  return new, {**metrics, 'finite': finite}


def eval_step(state: TrainState, batch: dict, *, model, num_classes: int, start: int = 0):
  """Sums of loss, top-1 and top-5 hits over the real (mask=1) examples of the global batch."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       batch['image'], train=False, start=start)
  mask = batch['mask'].astype(jnp.float32)
  loss = cross_entropy(logits, batch['label'], num_classes, 0.0)
  top5 = lax.top_k(logits, min(5, num_classes))[1] == batch['label'][:, None]
  sums = {'loss': (loss * mask).sum(), 'count': mask.sum(),
          'top1': ((jnp.argmax(logits, -1) == batch['label']) * mask).sum(),
          'top5': (top5.any(-1) * mask).sum()}
  return lax.psum(sums, AXIS)


def data_parallel(step_fn, mesh, *, donate: bool):
  """jit(shard_map(step)): replicated state, batch split over `AXIS`, replicated outputs."""
  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P())
  return jax.jit(sharded, donate_argnums=(0,) if donate else ())


def to_global(tree, sharding):
  """Host-local numpy (this host's rows, or the full value if replicated) to global arrays."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


def _state(s: Setup, variables: dict, rng, phase: int = 0) -> TrainState:
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=s.optimizers[phase].init(params), rng=rng)


def init_state(s: Setup, config: ConfigDict, init=None, pretrained=None) -> TrainState:
  """Fresh (or `init_from`-loaded) variables, and optimizer state for the trainable leaves.

  `init(rng)` gives the fresh variables (default: `models.init_variables`); `pretrained`, the
  `checkpoint.load_pretrained` result of `init_from` when the caller has already read it."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if init is None:
    init = lambda rng: models.init_variables(s.model, s.image_size, rng)
  variables = flax.core.unfreeze(init(init_rng))
  head = variables['params'][models.common.HEAD]
  # A fresh head's kernel scaled; `load_init_from` replaces the head when it keeps the old one.
  head = dict(head, kernel=head['kernel'] * s.plan.head_init_scale)
  variables = {**variables, 'params': {**variables['params'], models.common.HEAD: head}}
  if config.finetune.init_from:
    variables = load_init_from(s, config.finetune.init_from, variables, pretrained)
  return _state(s, variables, state_rng)


def abstract_state(s: Setup, phase: int = 0) -> TrainState:
  """Shapes and dtypes of the train state in `phase`, replicated over the mesh, uncomputed."""
  def build():
    rng = jax.random.PRNGKey(0)
    x = jnp.zeros((1, s.image_size, s.image_size, 3))
    return _state(s, s.model.init({'params': rng, 'dropout': rng}, x, train=False), rng, phase)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s.replicated),
                      jax.eval_shape(build))


def evaluate(s: Setup, eval_fn, state: TrainState, batches) -> dict:
  """Top-1/top-5/loss over every example of the evaluation `batches`, each seen exactly once."""
  totals = None
  for batch in batches:
    sums = eval_fn(state, to_global(batch, s.batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = host_value(totals)
  n = max(float(totals['count']), 1.0)
  result = {'loss': float(totals['loss']) / n, 'top1': float(totals['top1']) / n}
  if s.info.num_classes >= 5:
    result['top5'] = float(totals['top5']) / n
  return result


def parallel_steps(s: Setup, config: ConfigDict, *, donate: bool = True, start: int = 0,
                   phase: int = 0):
  """The data-parallel train and eval steps of this setup, with their static options bound.

  `start=k`: the steps take the outputs of the first k stages instead of images. `phase`: the
  fine-tuning plan's phase whose stages the train step trains.
  """
  num_classes = s.model_meta['num_classes']
  step_fn = data_parallel(functools.partial(
      train_step, model=s.model, tx=s.optimizers[phase], frozen=s.plan.model_frozen(phase),
      frozen_keys=s.plan.frozen_keys(phase), num_classes=num_classes,
      smoothing=config.optim.label_smoothing, aux_weight=config.optim.aux_loss_weight,
      skip_nonfinite=config.train.on_nonfinite == 'skip', start=start,
      bn_group_size=config.model.bn_group_size), s.mesh, donate=donate)
  eval_fn = data_parallel(functools.partial(eval_step, model=s.model, num_classes=num_classes,
                                            start=start), s.mesh, donate=False)
  return step_fn, eval_fn


def _on_device(s: Setup, batches, first_step: int, ahead: int = 2):
  """Checked global batches, `ahead` of them already sent to the devices while a step runs."""
  queue = collections.deque()
  for step, batch in enumerate(batches, first_step):
    _check_labels(batch, s.model_meta['num_classes'], step)
    queue.append(to_global(batch, s.batch_sharding))
    if len(queue) > ahead:
      yield queue.popleft()


def _check_labels(batch: dict, num_classes: int, step: int):
  labels = np.asarray(batch['label'])
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f'Batch at step {step} has labels in [{labels.min()}, {labels.max()}] but the model has '
        f'{num_classes} classes; set model.num_classes to 0 (use the dataset\'s) or fix '
        'data.classes.')



def host_value(tree):
  """Replicated global arrays as numpy: reads this host's copy, so it works on any host."""
  return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), tree))


def _split(state: TrainState) -> tuple[dict, dict]:
  return ({'params': state.params, 'batch_stats': state.batch_stats},
          {'step': state.step, 'opt_state': state.opt_state, 'rng': state.rng})


def restore_or_init(s: Setup, config: ConfigDict, mngr) -> TrainState:
  """The latest complete checkpoint of this workdir if there is one, else a fresh state."""
  variables, _ = _split(abstract_state(s))
  # The optimizer state has the shape of its step's phase.
  restored = checkpoint.restore_latest(
      mngr, variables, lambda step: _split(abstract_state(s, s.plan.phase_at(step)))[1],
      config.optim.learning_rate)
  if restored is None:
    return jax.device_put(init_state(s, config), s.replicated)
  step, variables, train = restored
  logging.warning('Resuming from checkpoint step %d in %s.', step, mngr.directory)
  return TrainState(**variables, **train)


def train_and_evaluate(config: ConfigDict, workdir: str, on_config_change: str = 'refuse'):
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, writes results.

  Returns the results dict; `results['preempted']` is True when SIGTERM or SIGINT stopped the
  run after saving a checkpoint at a step boundary (`results['stopped_by']` names the signal;
  running the same command again resumes from it). The workdir is locked for the run's life.
  """
  t0 = time.perf_counter()
  s = make_setup(config)
  rundir.make(workdir)
  with rundir.Lock(workdir):
    rundir.claim(workdir, config, on_config_change)
    return _train(s, config, workdir, t0)


def _train(s: Setup, config: ConfigDict, workdir: str, t0: float) -> dict:
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep)
  best = (checkpoint.manager(os.path.join(workdir, 'best'), best_metric='top1', keep_best=1)
          if config.checkpoint.keep_best else None)
  state = restore_or_init(s, config, mngr)
  with rundir.Preemption() as preemption:
    return fit(s, config, state, workdir, t0=t0, mngr=mngr, best=best, preemption=preemption)


class _NoPreemption:
  requested, signal_name = False, None

  def stop(self, step: int) -> bool:
    del step
    return False


def fit(s: Setup, config: ConfigDict, state: TrainState, workdir: str, *,
        t0: float | None = None, mngr=None, best=None, preemption=None, programs=None,
        evaluation=None, eval_steps: set | None = None, progress: bool = True,
        extra: dict | None = None) -> dict:
  """The training loop of every run: `train_and_evaluate`'s, and each run of the experiments.

  Trains `state` from its step to the end, with the trainer's checks (labels in range,
  non-finite steps), batches sent two steps ahead, feature caching, fine-tuning phases,
  `metrics.jsonl` and TensorBoard in `workdir`; then writes results.json / results.md (`extra`
  merged in) and returns the results. Checkpoints go to `mngr` (and the best evaluation to
  `best`) when given; `preemption` stops it at a step boundary. What many short runs in one
  process change: `programs(phase, start)` returns already compiled (train, eval) steps,
  `evaluation(split)` the evaluation batches of a split, `eval_steps` when to evaluate
  (default: every train.eval_every_epochs and at the end), `progress=False` hides the step bar.
  """
  t0 = time.perf_counter() if t0 is None else t0
  start = int(host_value(state.step))
  reporter = reporting.Reporter(workdir, s.total_steps, start, progress=progress)
  seconds = {'setup': time.perf_counter() - t0, 'first_step': 0.0, 'eval': 0.0}
  t0 = time.perf_counter()
  cache = feature_cache.build(s, config, state) if s.cache_stages else None
  if cache:
    reporter.write('feature_cache', start, {'stages': cache.stages, 'seconds': cache.seconds,
                                            'mib': cache.nbytes / 2**20})
  cached = cache.stages if cache else 0
  if programs is None:
    programs = lambda phase, start: parallel_steps(s, config, start=start, phase=phase)
  if evaluation is None:
    evaluation = lambda split: input_pipeline.eval_batches(
        config.data, global_batch_size=config.train.eval_batch_size, split=split)
  if eval_steps is None:
    every = max(1, int(config.train.eval_every_epochs * s.steps_per_epoch))
    eval_steps = set(range(every, s.total_steps + 1, every)) | {s.total_steps}
  loop = _Loop(s, config, reporter, preemption or _NoPreemption(), mngr, best, seconds,
               lambda phase: programs(phase, cached),
               (lambda: cache.eval) if cache else (lambda: evaluation(None)), eval_steps)
  state, eval_metrics = loop.run(state, feature_cache.train_batches(
      cache, config.data, seed=config.seed, start_step=start,
      global_batch_size=config.train.batch_size))
  test = datasets.test_split(config.data)
  if test:  # the final number, on a split that chose nothing
    test_fn = programs(s.plan.phase_at(s.total_steps), 0)[1] if cached else loop.eval_fn
    t = time.perf_counter()
    test_metrics = evaluate(s, test_fn, state, evaluation(test))
    seconds['eval'] += time.perf_counter() - t
    reporter.write('test', s.total_steps, test_metrics)
    eval_metrics = {**eval_metrics, **{f'test_{k}': v for k, v in test_metrics.items()}}
  if mngr is not None:
    mngr.wait_until_finished()
  reporter.close()
  results = _results(s, config, state, eval_metrics, start, time.perf_counter() - t0)
  # Where a cold start goes: setup (data, model, restore), the first step (tracing and
  # compiling it), evaluation (its compile included), and the other steps with checkpoints.
  seconds['other_steps'] = results['wall_seconds'] - seconds['first_step'] - seconds['eval']
  results['seconds'] = {k: round(v, 2) for k, v in seconds.items()}
  results['cached_stages'] = s.cache_stages
  results['preempted'] = loop.preemption.requested
  results['stopped_by'] = loop.preemption.signal_name
  results.update(extra or {})
  reporting.write_results(workdir, results)
  return results


@dataclasses.dataclass
class _Loop:
  """The step loop: log, evaluate and checkpoint on schedule; stop at a step on SIGTERM.

  Adds the first step's and the evaluations' wall time to `seconds`."""
  s: Setup
  config: ConfigDict
  reporter: Any
  preemption: Any
  mngr: Any
  best: Any
  seconds: dict
  programs: Any  # phase -> (train step, eval step)
  evaluation: Any  # () -> evaluation batches
  eval_steps: set
  eval_fn: Any = None  # the compiled eval step, once `run` has built it

  def __post_init__(self):
    self.lr = optim.schedule(self.config.optim, self.s.steps_per_epoch, self.s.total_steps)

  def evaluate(self, eval_fn, state, step: int | None = None) -> dict:
    t = time.perf_counter()
    metrics = evaluate(self.s, eval_fn, state, self.evaluation())
    self.seconds['eval'] += time.perf_counter() - t
    if step is not None:
      self.reporter.write('eval', step, {**metrics, 'epoch': step / self.s.steps_per_epoch})
    return metrics

  def run(self, state: TrainState, batches):
    s, config, reporter = self.s, self.config, self.reporter
    start = int(host_value(state.step))
    phase = s.plan.phase_at(start)
    step_fn, eval_fn = self.programs(phase)
    self.eval_fn = eval_fn
    pending, eval_metrics = [], None
    batches = _on_device(s, batches, start + 1)
    for step in range(start + 1, s.total_steps + 1):
      if s.plan.phase_at(step) != phase:
        phase = s.plan.phase_at(step)
        state = _enter_phase(s, state, phase)
        step_fn, _ = self.programs(phase)
        reporter.write('phase', step, {'phase': phase})
        logging.info('Phase %d from step %d: frozen %s.', phase, step,
                     s.plan.phases[phase].frozen)
      batch, t = next(batches), time.perf_counter()
      state, metrics = step_fn(state, batch)
      if step == start + 1:
        jax.block_until_ready(metrics)
        self.seconds['first_step'] = time.perf_counter() - t
      pending.append((step, metrics))
      last, stop = step == s.total_steps, self.preemption.stop(step)
      save = self.mngr is not None and (step % config.checkpoint.every_steps == 0 or last or stop)
      evaluate_now = step in self.eval_steps
      if step % config.train.log_every_steps == 0 or save or evaluate_now or last:
        _log_train(reporter, pending, config, self.lr)  # raises on a non-finite step
        pending = []
      if evaluate_now:
        eval_metrics = self.evaluate(eval_fn, state, step)
        if self.best is not None:
          checkpoint.save_state(self.best, step, *_split(state), {**s.model_meta, 'step': step},
                                metrics=eval_metrics)
      if save:
        checkpoint.save_state(self.mngr, step, *_split(state),
                              {**s.model_meta, 'step': step, 'data_position': step})
      reporter.advance(step)
      if stop:
        reporter.write('preempted', step, {})
        logging.warning('Stopped by %s: saved the checkpoint of step %d; run the same command '
                        'to resume from it.', self.preemption.signal_name, step)
        break
    if eval_metrics is None:  # resumed after the last step, or preempted before an evaluation
      eval_metrics = self.evaluate(eval_fn, state)
    return state, eval_metrics


def _enter_phase(s: Setup, state: TrainState, phase: int) -> TrainState:
  """The state under `phase`'s optimizer: the old optimizer state of every key that stays
  trained, a fresh one for the keys it unfreezes."""
  fresh = jax.jit(s.optimizers[phase].init, out_shardings=s.replicated)(state.params)
  return state.replace(opt_state=optim.carry_over(state.opt_state, fresh))


def _log_train(reporter, pending: list, config: ConfigDict, lr):
  """Averages the step metrics since the last log: one host sync per log, not per step."""
  values = host_value([m for _, m in pending])
  bad = [st for (st, _), v in zip(pending, values) if not v['finite']]
  if bad and config.train.on_nonfinite == 'stop':
    raise FloatingPointError(
        f'Non-finite loss or gradient at step {bad[0]}; stopped without saving it, so the last '
        'good checkpoint is kept. Lower optim.learning_rate, set optim.grad_clip, or set '
        'train.on_nonfinite=skip.')
  mean = {k: float(np.mean([v[k] for v in values])) for k in ('loss', 'accuracy')}
  step = pending[-1][0]
  reporter.write('train', step, {**mean, 'skipped': len(bad), 'lr': float(lr(step - 1)),
                                 'images_per_sec': reporter.throughput(
                                     step, config.train.batch_size)})


def _results(s: Setup, config, state, eval_metrics: dict, start: int, seconds: float) -> dict:
  counts = {True: 0, False: 0}  # trained in some phase, or frozen throughout
  for key, sub in state.params.items():
    counts[s.plan.trained(key)] += sum(int(np.prod(p.shape)) for p in jax.tree.leaves(sub))
  steps_run = s.total_steps - start
  return {'model': config.model.name, 'dataset': config.data.name,
          'eval_split': datasets.eval_split(config.data),
          'test_split': datasets.test_split(config.data), **eval_metrics,
          'steps': s.total_steps, 'epochs': config.train.num_epochs,
          'examples_per_sec': steps_run * config.train.batch_size / max(seconds, 1e-9),
          'trainable_params': counts[True], 'frozen_params': counts[False],
          'freeze_depth': config.finetune.freeze_depth, 'finetune': s.plan.describe(),
          'num_train': s.info.num_train, 'num_eval': s.info.num_eval,
          'devices': jax.device_count(), 'wall_seconds': seconds}
