"""The run machinery shared by the experiments: many short fine-tuning runs in one process.

Each run goes through the trainer's own loop, `train.fit` (same model, fine-tuning plan,
optimizer, input pipeline, checks and seeds as `cnn_arch.main`), without what a sweep of dozens
of tiny runs cannot afford: orbax checkpoints every run, and recompiling the step for every run.
Compiled steps are kept per program shape (`_PROGRAMS`) and, across processes, in JAX's
persistent compilation cache; evaluation images are decoded once per data view, the outputs of
a frozen prefix on them are computed once per prefix (`prefix_eval_batches`), and each
`init_from` checkpoint is restored once. A run is one directory holding `results.json` (written
last, atomically) and `metrics.jsonl`; a directory that already holds `results.json` is not run
again, so an interrupted sweep resumes where it stopped. `run_tuned` runs a sweep's arms each
at the learning rate it selects on validation from a small grid. Source-task pretraining, whose
checkpoint the fine-tuning runs start from, goes through `train.train_and_evaluate` itself.
"""

import collections
import fcntl
import functools
import hashlib
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cnn_arch import checkpoint, datasets, feature_cache, input_pipeline, models, train
from cnn_arch.train_setup import make_setup

_PROGRAMS = {}  # program key -> (jitted train step, jitted eval step)
_EVAL_DATA = {}  # data view key -> list of padded eval batches (numpy)
_INIT_FNS = {}  # model key -> compiled `model.init`
_PRETRAINED = {}  # checkpoint directory -> (variables, meta)
_PREFIX_EVAL = collections.OrderedDict()  # (prefix values, view, split) -> eval batches of features
_PREFIX_EVAL_SIZE = 4  # entries kept: a sweep's consecutive runs share one prefix
_EXTRACTORS = {}  # (model key, stage) -> jitted inference up to that stage
_PROGRESS_POSITION = None  # this process's line for its progress bar, when several share a terminal

def set_progress_position(position: int):
  global _PROGRESS_POSITION
  _PROGRESS_POSITION = position


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


def programs(s, config: ConfigDict, phase: int = 0, start: int = 0):
  """The jitted trainer steps for this program shape, compiled once per process.

  Built exactly as `train_and_evaluate` builds them (the state is donated), so a source run and
  target runs of the same shape share one entry of the persistent compilation cache.
  """
  # What the compiled steps depend on (`train.parallel_steps`), and nothing else: runs that
  # differ only in their initialisation (scratch or pretrained, AnB or BnB), their seed or
  # their epoch length (without a warm-up or step decay) or their learning rate (a value of the
  # optimizer state, `optim.make`) share programs.
  plan = s.plan
  epoch = s.steps_per_epoch if config.optim.warmup_epochs or config.optim.schedule == 'step' else 0
  optim = {k: v for k, v in config.optim.items() if k != 'learning_rate'}  # a state value
  key = _key(config.model, s.model_meta['num_classes'], optim,
             config.train.on_nonfinite, config.train.batch_size, config.train.eval_batch_size,
             s.image_size, s.total_steps, epoch, plan.frozen_keys(phase), plan.model_frozen(phase),
             [(k, plan.key_lr_mult(k)) for k in plan.keys], phase, start)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = train.parallel_steps(s, config, donate=True, start=start, phase=phase)
  return _PROGRAMS[key]


def _eval_view(data: ConfigDict) -> dict:
  """The data keys that decide evaluation batches: the training-view keys (per_class,
  fraction, subset_seed) do not change evaluation splits."""
  return {k: v for k, v in data.items() if k not in ('per_class', 'fraction', 'subset_seed')}


def eval_batches(data: ConfigDict, batch_size: int, split: str | None = None) -> list[dict]:
  """A split of a data view as padded evaluation batches, read and decoded once per process and
  shared by every seed and target size of one task (`_eval_view`)."""
  key = _key(_eval_view(data), batch_size, split)
  if key not in _EVAL_DATA:
    _EVAL_DATA[key] = list(input_pipeline.eval_batches(data, global_batch_size=batch_size,
                                                       split=split))
  return _EVAL_DATA[key]


def _prefix_digest(s, state, depth: int) -> str:
  """A digest of the values of the first `depth` body stages (parameters and BatchNorm
  statistics): runs whose frozen prefixes are equal, bit for bit, share its features."""
  stages = s.plan.body[:depth]
  digest = hashlib.sha256()
  for tree in (state.params, state.batch_stats):
    part = {k: v for k, v in tree.items() if s.plan.stage_of(k) in stages}
    for path, leaf in jax.tree_util.tree_flatten_with_path(train.host_value(part))[0]:
      digest.update(jax.tree_util.keystr(path).encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def prefix_eval_batches(s, config: ConfigDict, state, depth: int, split: str | None) -> list:
  """`eval_batches` of `split` with each image replaced by the output of the first `depth`
  stages of `state` (inference mode), computed once for all runs with the same prefix values.

  Valid for a prefix that the run keeps frozen throughout (`plan.cached_prefix`): frozen stages
  keep their parameters bit-identical and run on their BatchNorm running statistics, so their
  output on an evaluation image is the same at every step.
  """
  key = (_prefix_digest(s, state, depth), _key(s.model_meta, s.image_size, depth,
                                                _eval_view(config.data)), split)
  if key not in _PREFIX_EVAL:
    stage = s.plan.body[depth - 1]
    fn_key = (_key(s.model_meta, s.image_size), stage)
    if fn_key not in _EXTRACTORS:
      _EXTRACTORS[fn_key] = feature_cache.extractor(s.model, stage, s.mesh,
                                                    s.batch_sharding.spec)
    extract = _EXTRACTORS[fn_key]
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    _PREFIX_EVAL[key] = [
        dict(batch, image=feature_cache.host_outputs(s, extract, variables, batch['image']))
        for batch in eval_batches(config.data, config.train.eval_batch_size, split)]
    while len(_PREFIX_EVAL) > _PREFIX_EVAL_SIZE:
      _PREFIX_EVAL.popitem(last=False)
  _PREFIX_EVAL.move_to_end(key)
  return _PREFIX_EVAL[key]


def _init_fn(s):
  """`model.init` compiled once per architecture (without XLA's backend optimisations, as
  `models.init_variables` does: it runs once per seed); a new seed is then only an execution."""
  key = _key(s.model_meta, s.image_size)
  if key not in _INIT_FNS:
    x = jnp.zeros((1, s.image_size, s.image_size, 3), jnp.float32)
    rng = jax.random.PRNGKey(0)
    init = jax.jit(functools.partial(s.model.init, train=False))
    compiled = init.lower({'params': rng, 'dropout': rng}, x).compile(
        compiler_options={'xla_backend_optimization_level': 0})
    _INIT_FNS[key] = lambda r: compiled({'params': r, 'dropout': r}, x)
  return _INIT_FNS[key]


def _pretrained(path: str):
  """`checkpoint.load_pretrained(path)`, restored once per process: an orbax restore costs more
  than a short run's setup, and a sweep writes each checkpoint before any run reads it."""
  key = checkpoint.resolve(path)
  if key not in _PRETRAINED:
    variables, meta = checkpoint.load_pretrained(key)
    # Kept on the host: each run gets its own device copy, which its donating step may delete.
    _PRETRAINED[key] = (jax.device_get(variables), meta)
  return _PRETRAINED[key]


def init_state(s, config: ConfigDict) -> train.TrainState:
  """`train.init_state` (same seeds, same fine-tuning plan), with the init compiled once and
  `init_from` read once."""
  path = config.finetune.init_from
  return jax.device_put(train.init_state(s, config, init=_init_fn(s),
                                         pretrained=_pretrained(path) if path else None),
                        s.replicated)


def eval_steps(total_steps: int, at: tuple[float, ...]) -> set[int]:
  """The steps at fractions `at` of a run (1.0: the last step)."""
  return {max(1, round(total_steps * f)) for f in at}


def evenly(num_evals: int) -> tuple[float, ...]:
  """`num_evals` fractions spread evenly over a run, the last 1.0."""
  return tuple((i + 1) / num_evals for i in range(num_evals))


def run(config: ConfigDict, workdir: str, *, eval_at: tuple[float, ...] = (1.0,),
        extra: dict | None = None, keep_final: bool = False):
  """Trains and evaluates one configuration in `workdir` with the trainer's loop
  (`train.fit`), or returns its stored results.

  An evaluation at each fraction `eval_at` of the run, each an `{"split": "eval", "step",
  "epoch", "top1", "loss"}` line of `metrics.jsonl`. No checkpoints, except with `keep_final`
  the last step's (in WORKDIR/checkpoints, the trainer's format: another run's `init_from`).
  Returns the results dict (`extra` merged).
  """
  done = os.path.join(workdir, 'results.json')
  if os.path.exists(done):
    return read_json(done)
  os.makedirs(workdir, exist_ok=True)
  for stale in ('metrics.jsonl', 'tensorboard', 'checkpoints'):  # of a run killed before its end
    path = os.path.join(workdir, stale)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)
  t0 = time.perf_counter()
  s = make_setup(config)
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), keep=1) if keep_final else None
  state = init_state(s, config)
  # A prefix frozen throughout (and not already cached by the trainer, as it is without
  # augmentation) is evaluated once for every run that has the same prefix; the run evaluates
  # its other stages on those features.
  depth = 0 if s.cache_stages or config.finetune.cache_features == 'off' else s.plan.cached_prefix
  if depth:
    steps = lambda phase, start: (programs(s, config, phase, start)[0],
                                  programs(s, config, phase, depth)[1])
    # Computed now: the train step donates `state`'s arrays.
    features = {split: prefix_eval_batches(s, config, state, depth, split)
                for split in {None, datasets.test_split(config.data)}}
    evaluation = features.__getitem__
  else:
    steps = lambda phase, start: programs(s, config, phase, start)
    evaluation = lambda split: eval_batches(config.data, config.train.eval_batch_size, split)
  return train.fit(s, config, state, workdir, t0=t0, mngr=mngr, programs=steps,
                   evaluation=evaluation, eval_steps=eval_steps(s.total_steps, eval_at),
                   progress=False, extra=extra)


def with_lr(config: ConfigDict, lr: float) -> ConfigDict:
  config = ConfigDict(config.to_dict())
  config.optim.learning_rate = lr
  return config


def check_tune(tune: ConfigDict):
  """Raises ValueError naming the `tune` key that is out of range."""
  factors = tuple(tune.factors)
  if not factors or any(not isinstance(f, (int, float)) or f <= 0 for f in factors):
    raise ValueError(f'tune.factors={factors!r}: give one or more positive multiples of the '
                     'configured learning rate, e.g. --config.tune.factors="(0.25, 1.0, 4.0)", '
                     'or (1.0,) for the configured rate alone.')
  if not isinstance(tune.seeds, int) or tune.seeds < 1:
    raise ValueError(f'tune.seeds={tune.seeds!r}: the number of seeds per cell that run the '
                     'learning-rate grid must be an integer >= 1.')


def tuning(cfg: ConfigDict, experiment: str) -> ConfigDict:
  """`cfg.tune` (checked) for an experiment that `tune.experiments` names; else the configured
  rate alone. Experiments call it before they train anything."""
  check_tune(cfg.tune)
  if experiment in cfg.tune.experiments:
    return cfg.tune
  return ConfigDict(dict(factors=(1.0,), seeds=1))


def run_tuned(jobs: list[tuple], tune: ConfigDict, runs_dir: str, desc: str,
              **run_kwargs) -> tuple[list[tuple[dict, dict, str]], list[dict]]:
  """Runs `jobs` at the learning rate each cell selects on validation.

  `jobs`: (cell, name, config, fields[, run keyword arguments]) tuples; the jobs of one cell
  are the seeds (and schedules) of one arm. The grid is `tune.factors` times each config's
  `optim.learning_rate`. The first `tune.seeds` jobs of every cell run at every rate of the
  grid; the cell takes the rate of highest mean validation top-1 (ties: the first factor; a run
  that diverges counts as failed), and its other jobs run at that rate only (the selection runs
  at it are reused). Workdirs are RUNS_DIR/NAME_lrLR, so a resumed sweep skips both kinds.
  Returns ((fields + 'lr', results, workdir) per job in order, the grid's rows: fields + 'lr',
  'val_top1', None when diverged).
  """
  check_tune(tune)
  cells = {}
  for job in jobs:
    cells.setdefault(job[0], []).append(job)
  workdir = lambda name, lr: os.path.join(runs_dir, f'{name}_lr{lr:.4g}')
  rates = lambda config: [f * config.optim.learning_rate for f in tune.factors]
  kwargs = lambda job: {**run_kwargs, **(job[4] if len(job) > 4 else {})}
  grid, scores = [], {}
  selection = [(job, lr) for cell_jobs in cells.values() for job in cell_jobs[:tune.seeds]
               for lr in rates(job[2])]
  for job, lr in progress(selection, f'{desc} (lr grid)'):
    cell, name, config, fields = job[:4]
    try:
      top1 = run(with_lr(config, lr), workdir(name, lr), **kwargs(job))['top1']
    except FloatingPointError:
      top1 = None
    grid.append({**fields, 'lr': lr, 'val_top1': top1})
    scores.setdefault(cell, {}).setdefault(lr, []).append(-1.0 if top1 is None else top1)
  chosen = {cell: max(by_lr, key=lambda lr: sum(by_lr[lr]) / len(by_lr[lr]))
            for cell, by_lr in scores.items()}
  out = []
  for job in progress(jobs, desc):
    cell, name, config, fields = job[:4]
    lr = chosen[cell]
    out.append(({**fields, 'lr': lr},
                run(with_lr(config, lr), workdir(name, lr), **kwargs(job)), workdir(name, lr)))
  return out, grid


def pretrain(config: ConfigDict, workdir: str) -> dict:
  """Source-task training through the trainer itself (checkpoints, resumption, results.json).

  Experiments running in parallel (`run_all --jobs`) that need the same source network wait for
  the one process that trains it.
  """
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  with open(workdir + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = os.path.join(workdir, 'results.json')
    if os.path.exists(done):
      return read_json(done)
    return train.train_and_evaluate(config, workdir)


def steps_for(config: ConfigDict, steps: int) -> ConfigDict:
  """A copy of `config` that trains for exactly `steps` steps on its data view.

  A fixed step count (not epochs) keeps the schedule, hence the compiled program, identical
  across target sizes, and gives every size the same compute. A view smaller than the batch
  (1 example per class) trains with the whole view as its batch.
  """
  config = ConfigDict(config.to_dict())
  info = input_pipeline.get_info(config.data)
  if info.num_train < config.train.batch_size:
    devices = jax.device_count()
    config.train.batch_size = max(devices, info.num_train // devices * devices)
  per_epoch = input_pipeline.steps_per_epoch(info, config.train.batch_size)
  config.train.num_epochs = steps / per_epoch
  config.optim.warmup_epochs = 0.0  # a warm-up counted in epochs would differ across sizes
  return config


def target_config(cfg: ConfigDict, *, per_class: int, seed: int, steps: int, depth: int = 0,
                  init_from: str = '', norm: str | None = None,
                  target: ConfigDict | None = None) -> ConfigDict:
  """The trainer config of one run on `target` (default `cfg.target`); `per_class` 0 means the
  whole training set.

  The seed sets the head's initialisation, the data order and augmentation, and which
  `per_class` examples are drawn (`data.subset_seed`). With `init_from`, every body stage is
  copied and the head starts fresh even when source and target have as many classes (the
  lecture's "replace the last layer"): a source head maps the target's images to unrelated
  labels.
  """
  c = ConfigDict((target or cfg.target).to_dict())
  c.seed = seed
  c.data.per_class = per_class or None
  c.data.subset_seed = seed
  c.finetune.freeze_depth = depth
  c.finetune.init_from = init_from
  if norm:
    c.model.options.norm = norm
  if init_from:
    c.finetune.copy_depth = len(stage_names(c)) - 1
  return steps_for(c, steps)


def pretrained(cfg: ConfigDict, out: str, norm: str = 'batch', source: str = 'source') -> str:
  """The checkpoint the target runs start from: `cfg.init_from`, or the `source` section
  (`cfg.source`, or another source task such as `cfg.fractaldb`) trained once per norm."""
  if cfg.init_from and source == 'source':
    if norm != cfg.target.model.options.get('norm', 'batch'):
      raise ValueError(f'init_from={cfg.init_from} holds one network; there is no {norm!r} '
                       'variant of it. Drop that norm from the experiment config, or set '
                       'init_from to \'\' and configure `source` to pretrain one per norm.')
    return cfg.init_from
  config = ConfigDict(cfg[source].to_dict())
  config.model.options.norm = norm
  workdir = os.path.join(out, f'pretrain_{norm}' if source == 'source' else
                         f'pretrain_{source}_{norm}')
  pretrain(config, workdir)
  return workdir


def stage_names(trainer_config: ConfigDict) -> tuple[str, ...]:
  """('stem', 'stage1', ..., 'head') of the configured model (no parameters are built)."""
  options = dict(trainer_config.model.options)
  return tuple(models.get_model(trainer_config.model.name, num_classes=2, **options).stage_names)


def size_label(per_class: int, num_train: int) -> str:
  """A target size as the tables write it: '20/class (100)', or 'all (27000)' for per_class 0."""
  return f'{per_class}/class ({num_train})' if per_class else f'all ({num_train})'


def lr_label(lr: float | None) -> str:
  """' (lr 0.05)' after a table cell: the learning rate its runs used; '' when not recorded."""
  return f' (lr {lr:g})' if lr is not None else ''


def progress(iterable, desc: str):
  """A tqdm bar over an experiment's runs (the trainer's own bars show steps)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(list(iterable), desc=desc, unit='run', dynamic_ncols=True,
                   position=_PROGRESS_POSITION, leave=_PROGRESS_POSITION is None)


def with_preset(config_flag, preset: str) -> ConfigDict:
  """The flag's config file loaded with `get_config(preset)`, its `--config.x=...` overrides
  applied again (`--preset=full` is `--config=FILE:full`)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = config_flags.get_config_filename(config_flag)
  spec = importlib.util.spec_from_file_location('experiment_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(preset)
  for key, value in config_flags.get_override_values(config_flag).items():
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def main(experiment):
  """Command line of one experiment: `--config=configs/experiments/X.py --out=DIR
  [--preset=full]`."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = config_flags.DEFINE_config_file('config', 'configs/experiments/digits.py',
                                           'An experiment config (configs/experiments/*.py).')
  out = flags.DEFINE_string('out', 'results', 'Output directory (finished runs are kept).')
  preset = flags.DEFINE_string('preset', '', "The config file's preset, e.g. 'full'.")

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    logging.set_verbosity(logging.WARNING)  # orbax and tfds log every file at INFO
    enable_compile_cache(os.path.join(out.value, 'jax_cache'))
    cfg = with_preset(flags.FLAGS['config'], preset.value) if preset.value else config.value
    experiment(cfg, out.value)

  app.run(run)
