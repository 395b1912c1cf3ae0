"""The run machinery shared by the experiments: many short fine-tuning runs in one process.

Each run is the trainer's own `train.train_step` / `train.eval_step` (same model, freezing,
optimizer, input pipeline and seeds as `cnn_arch.main`), driven by a short loop that skips what
a sweep of dozens of tiny runs cannot afford: orbax checkpoints every run, and recompiling the
step for every run. Compiled steps are kept per program shape (`_PROGRAMS`) and, across
processes, in JAX's persistent compilation cache; evaluation images are decoded once per data
view. A run is one directory holding `results.json` (written last, atomically) and
`metrics.jsonl`; a directory that already holds `results.json` is not run again, so an
interrupted sweep resumes where it stopped. Source-task pretraining, whose checkpoint the
fine-tuning runs start from, goes through `train.train_and_evaluate` itself.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cnn_arch import input_pipeline, models, train
from cnn_arch.train_setup import load_init_from, make_setup

_PROGRAMS = {}  # program key -> (jitted train step, jitted eval step)
_EVAL_DATA = {}  # data view key -> list of padded eval batches (numpy)
_INITS = {}  # (model key, seed) -> freshly initialised variables (numpy)


def enable_compile_cache(directory: str):
  """Persists compiled programs so a second process (or a resumed sweep) skips XLA compiles."""
  jax.config.update('jax_compilation_cache_dir', os.path.abspath(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value):
  """Writes through a temporary file and a rename, so a killed run never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1, default=float)
  os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str, rows: list[dict]):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r, default=float) + '\n' for r in rows)
  os.replace(tmp, path)


def _key(*parts) -> str:
  return json.dumps([p.to_dict() if isinstance(p, ConfigDict) else p for p in parts],
                    sort_keys=True, default=str)


def programs(s, config: ConfigDict):
  """The jitted trainer steps for this program shape, compiled once per process."""
  key = _key(config.model, config.optim, config.finetune.freeze_depth, config.train.batch_size,
             config.train.eval_batch_size, s.image_size, s.total_steps, s.steps_per_epoch,
             s.model_meta['num_classes'])
  if key not in _PROGRAMS:
    num_classes = s.model_meta['num_classes']
    step = train.data_parallel(functools.partial(
        train.train_step, model=s.model, tx=s.tx, frozen=config.finetune.freeze_depth,
        frozen_keys=s.frozen_keys, num_classes=num_classes,
        smoothing=config.optim.label_smoothing, skip_nonfinite=False), s.mesh, donate=False)
    evaluate = train.data_parallel(functools.partial(
        train.eval_step, model=s.model, num_classes=num_classes), s.mesh, donate=False)
    _PROGRAMS[key] = (step, evaluate)
  return _PROGRAMS[key]


def eval_batches(data: ConfigDict, batch_size: int) -> list[dict]:
  """The evaluation split of a data view as padded batches, read and decoded once."""
  key = _key(data, batch_size)
  if key not in _EVAL_DATA:
    _EVAL_DATA[key] = list(input_pipeline.eval_batches(data, global_batch_size=batch_size))
  return _EVAL_DATA[key]


def init_state(s, config: ConfigDict) -> train.TrainState:
  """`train.init_state`, with the random initialisation computed once per (model, seed)."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  key = _key(s.model_meta, s.image_size, config.seed)
  if key not in _INITS:
    _INITS[key] = jax.device_get(models.init_variables(s.model, s.image_size, init_rng))
  variables = jax.tree.map(jnp.asarray, _INITS[key])
  if config.finetune.init_from:
    variables = load_init_from(s, config.finetune.init_from, variables)
  params = variables['params']
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           batch_stats=variables.get('batch_stats', {}),
                           opt_state=s.tx.init(params), rng=state_rng)
  return jax.device_put(state, s.replicated)


def evaluate(s, eval_fn, state, config: ConfigDict) -> dict:
  """Loss and top-1 over every evaluation example (padding masked out)."""
  totals = None
  for batch in eval_batches(config.data, config.train.eval_batch_size):
    sums = eval_fn(state, train.to_global(batch, s.batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  n = max(float(totals['count']), 1.0)
  return {'loss': float(totals['loss']) / n, 'top1': float(totals['top1']) / n}


def eval_steps(total_steps: int, num_evals: int) -> set[int]:
  """`num_evals` evaluation steps spread evenly over a run, always including the last."""
  return {max(1, round(total_steps * (i + 1) / num_evals)) for i in range(num_evals)}


def run(config: ConfigDict, workdir: str, *, num_evals: int = 1, extra: dict | None = None):
  """Trains and evaluates one configuration in `workdir`, or returns its stored results.

  Returns the results dict: top1/loss of the final evaluation, steps, epochs, seconds, `extra`.
  `metrics.jsonl` holds one `{"split": "eval", "step", "epoch", "top1", "loss"}` line per
  evaluation (`num_evals` of them, evenly spaced) and the mean training loss between them.
  """
  done = os.path.join(workdir, 'results.json')
  if os.path.exists(done):
    return read_json(done)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  s = make_setup(config)
  state = init_state(s, config)
  step_fn, eval_fn = programs(s, config)
  batches = input_pipeline.train_batches(config.data, global_batch_size=config.train.batch_size,
                                         seed=config.seed)
  points, rows, losses, metrics = eval_steps(s.total_steps, num_evals), [], [], {}
  for step in range(1, s.total_steps + 1):
    state, out = step_fn(state, train.to_global(next(batches), s.batch_sharding))
    losses.append(out['loss'])
    if step in points:
      loss = float(np.mean(jax.device_get(losses)))
      if not np.isfinite(loss):
        raise FloatingPointError(f'Non-finite training loss in {workdir} by step {step}; lower '
                                 'optim.learning_rate in the experiment config.')
      rows.append({'split': 'train', 'step': step, 'loss': loss})
      metrics = evaluate(s, eval_fn, state, config)
      rows.append({'split': 'eval', 'step': step, 'epoch': step / s.steps_per_epoch, **metrics})
      losses = []
  write_jsonl(os.path.join(workdir, 'metrics.jsonl'), rows)
  results = {**metrics, 'steps': s.total_steps, 'epochs': s.total_steps / s.steps_per_epoch,
             'num_train': s.info.num_train, 'num_eval': s.info.num_eval,
             'seconds': time.perf_counter() - t0, **(extra or {})}
  write_json(done, results)
  return results


def pretrain(config: ConfigDict, workdir: str) -> dict:
  """Source-task training through the trainer itself (checkpoints, resumption, results.json)."""
  done = os.path.join(workdir, 'results.json')
  if os.path.exists(done):
    return read_json(done)
  return train.train_and_evaluate(config, workdir)


def steps_for(config: ConfigDict, steps: int) -> ConfigDict:
  """A copy of `config` that trains for exactly `steps` steps on its data view.

  A fixed step count (not epochs) keeps the schedule, hence the compiled program, identical
  across target sizes, and gives every size the same compute.
  """
  config = ConfigDict(config.to_dict())
  per_epoch = input_pipeline.steps_per_epoch(input_pipeline.get_info(config.data),
                                             config.train.batch_size)
  config.train.num_epochs = steps / per_epoch
  config.optim.warmup_epochs = 0.0  # a warm-up counted in epochs would differ across sizes
  return config
