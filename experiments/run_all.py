"""All six experiments and the report, in one resumable command.

    python -m experiments.run_all --out=results/ [--preset=full]
        [--config=configs/experiments/digits.py]

Runs the freeze-depth sweep, Yosinski et al.'s transfer arms, surgical fine-tuning, scratch vs
pretrained, features in L2 space and the architecture comparison, then renders OUT/report.md.
`--preset=full` is the config file's `full` preset (`--config=...digits.py:full`). Finished runs (a
directory holding results.json) are not redone, so after an interruption the same command
continues; compiled programs persist in OUT/jax_cache. `--only=freeze_sweep,features_l2` runs
a subset (the report covers what exists).

The work runs in `--jobs` processes at once (default: one per CPU core) as tasks, longest
first, each taken by the first free process: the source networks (MNIST 0-4 per norm,
FractalDB; the surgical experiment trains its own ten-digit one), then each experiment, the
longer ones in independent parts (`parts(cfg)` of scratch_vs_pretrained and arch_compare); an
experiment split into parts is run whole afterwards, which finds every run finished and writes
its rows. Results do not depend on `--jobs`; timings do (the architecture comparison's models
take turns, so they share one load).
"""

import concurrent.futures
import multiprocessing
import os
import time

from experiments import arch_compare, common, features_l2, freeze_sweep, report
from experiments import scratch_vs_pretrained, surgical, transfer_arms

EXPERIMENTS = {
    freeze_sweep.NAME: freeze_sweep.run,
    transfer_arms.NAME: transfer_arms.run,
    surgical.NAME: surgical.run,
    scratch_vs_pretrained.NAME: scratch_vs_pretrained.run,
    features_l2.NAME: features_l2.run,
    arch_compare.NAME: arch_compare.run,
}


# Experiments in submission order, longest first. `tasks` puts the source networks before them,
# so that no experiment waits for another process to pretrain one (`common.pretrain` locks it).
_ORDER = (freeze_sweep.NAME, transfer_arms.NAME, scratch_vs_pretrained.NAME, surgical.NAME,
          arch_compare.NAME, features_l2.NAME)
_PARTS = {scratch_vs_pretrained.NAME: scratch_vs_pretrained.parts,
          arch_compare.NAME: arch_compare.parts}
TUNABLE = (freeze_sweep.NAME, transfer_arms.NAME, surgical.NAME, scratch_vs_pretrained.NAME)
_USES_SOURCE = (freeze_sweep.NAME, transfer_arms.NAME, features_l2.NAME)  # the BatchNorm one


def tasks(cfg, names) -> list[tuple[str, str, object, tuple]]:
  """(timing key, part label, function, its arguments but OUT) of every task, in order."""
  norms = list(cfg.scratch.norms) if scratch_vs_pretrained.NAME in names else []
  if set(_USES_SOURCE) & set(names):
    norms = ['batch'] + [n for n in norms if n != 'batch']
  out = [] if cfg.init_from else [(f'pretrain_{norm}', '', _pretrain, (cfg, norm, 'source'))
                                  for norm in norms]
  if scratch_vs_pretrained.NAME in names:
    out += [(f'pretrain_fractaldb_{norm}', '', _pretrain, (cfg, norm, 'fractaldb'))
            for norm in cfg.scratch.norms if norm in cfg.scratch.fractaldb_norms]
  for name in names:
    parts = _PARTS[name](cfg) if name in _PARTS else [('', EXPERIMENTS[name], cfg)]
    out += [(name, label, fn, (part,)) for label, fn, part in parts]
  return out


def _pretrain(cfg, norm: str, source: str, out: str):
  common.pretrained(cfg, out, norm, source)


def _worker_init(positions, cache_dir: str):
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  common.enable_compile_cache(cache_dir)
  common.set_progress_position(positions.get())


def _task(fn, args: tuple, out: str) -> float:
  t = time.perf_counter()
  fn(*args, out)
  return time.perf_counter() - t


def run_all(cfg, out: str, only: tuple[str, ...] = (), jobs: int = 1) -> str:
  """Runs the selected experiments (all by default) in `jobs` processes (1: in this one) and
  renders the report; returns its path."""
  unknown = set(only) - set(EXPERIMENTS)
  if unknown:
    raise ValueError(f'Unknown experiment(s) {sorted(unknown)}; choose from {list(EXPERIMENTS)}.')
  common.check_tune(cfg.tune)
  untunable = set(cfg.tune.experiments) - set(TUNABLE)
  if untunable:
    raise ValueError(f'tune.experiments has {sorted(untunable)}; the experiments that select '
                     f'learning rates are {list(TUNABLE)}.')
  if jobs < 1:
    raise ValueError(f'--jobs={jobs}: use 1 (in this process) or more (parallel processes).')
  os.makedirs(out, exist_ok=True)
  common.write_json(os.path.join(out, 'config.json'), cfg.to_dict())  # the report names its preset
  done = os.path.join(out, 'timings.json')
  timings = common.read_json(done) if os.path.exists(done) else {}  # keep what --only skips
  names = [name for name in _ORDER if not only or name in only]
  todo = tasks(cfg, names)
  for key in {key for key, *_ in todo}:
    timings[key] = 0.0
  t0 = time.perf_counter()

  def finished(task, seconds: float):
    key, label = task[:2]
    timings[key] += seconds
    print(f'{key}{" " + label if label else ""}: {seconds:.0f} s', flush=True)

  if jobs == 1:
    for task in todo:
      finished(task, _task(*task[2:], out))
  else:
    # Spawned, not forked: a fork would copy this process's JAX and TensorFlow thread state.
    context = multiprocessing.get_context('spawn')
    positions = context.Queue()
    for i in range(min(jobs, len(todo))):
      positions.put(i)
    # Processes sharing a GPU must not each reserve most of its memory.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    with concurrent.futures.ProcessPoolExecutor(
        min(jobs, len(todo)), mp_context=context, initializer=_worker_init,
        initargs=(positions, os.path.join(out, 'jax_cache'))) as pool:
      futures = {pool.submit(_task, *task[2:], out): task for task in todo}
      for future in concurrent.futures.as_completed(futures):
        try:
          seconds = future.result()
        except BaseException:
          for other in futures:  # the running ones finish (their runs are kept), no new ones
            other.cancel()
          raise
        finished(futures[future], seconds)
  for name in names:  # gathers the rows of the experiments that ran in parts
    if name in _PARTS:
      timings[name] += _task(EXPERIMENTS[name], (cfg,), out)
  timings['wall'] = time.perf_counter() - t0
  path = report.render(out)
  common.write_json(done, timings)
  return path


def main():
  from absl import flags  # pylint: disable=g-import-not-at-top
  only = flags.DEFINE_list('only', [], f'Subset of {list(EXPERIMENTS)}.')
  jobs = flags.DEFINE_integer('jobs', len(os.sched_getaffinity(0)),
                              'Experiments run at once, each in its own process.')
  t0 = time.perf_counter()
  common.main(lambda cfg, out: print(
      f'{run_all(cfg, out, tuple(only.value), jobs.value)} written in '
      f'{time.perf_counter() - t0:.0f} s'))


if __name__ == '__main__':
  main()
