"""All six experiments and the report, in one resumable command.

    python -m experiments.run_all --out=results/ [--preset=full]
        [--config=configs/experiments/digits.py]

Runs the freeze-depth sweep, Yosinski et al.'s transfer arms, surgical fine-tuning, scratch vs
pretrained, features in L2 space and the architecture comparison, then renders OUT/report.md.
`--preset=full` is the config file's `full` preset (`--config=...digits.py:full`). Finished runs (a
directory holding results.json) are not redone, so after an interruption the same command
continues; compiled programs persist in OUT/jax_cache. `--only=freeze_sweep,features_l2` runs
a subset (the report covers what exists).

The experiments run in `--jobs` processes at once (default: one per CPU core), each with
XLA:CPU on one thread (`common.CPU_FLAGS`): a second thread speeds these small networks' steps
up by less than it costs when it is preempted. Results do not depend on `--jobs`; timings do
(the architecture comparison's models take turns, so they share one load).
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


# Submission order, longest first: each job goes to the first free process. Whichever
# experiment needs the BatchNorm source network first pretrains it; the others wait for it.
_ORDER = (arch_compare.NAME, scratch_vs_pretrained.NAME, freeze_sweep.NAME, transfer_arms.NAME,
          surgical.NAME, features_l2.NAME)


def _worker_init(positions, cache_dir: str):
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  common.enable_compile_cache(cache_dir)
  common.set_progress_position(positions.get())


def _experiment(name: str, cfg, out: str) -> float:
  t = time.perf_counter()
  EXPERIMENTS[name](cfg, out)
  return time.perf_counter() - t


def run_all(cfg, out: str, only: tuple[str, ...] = (), jobs: int = 1) -> str:
  """Runs the selected experiments (all by default) in `jobs` processes (1: in this one) and
  renders the report; returns its path."""
  unknown = set(only) - set(EXPERIMENTS)
  if unknown:
    raise ValueError(f'Unknown experiment(s) {sorted(unknown)}; choose from {list(EXPERIMENTS)}.')
  if jobs < 1:
    raise ValueError(f'--jobs={jobs}: use 1 (in this process) or more (parallel processes).')
  os.makedirs(out, exist_ok=True)
  common.write_json(os.path.join(out, 'config.json'), cfg.to_dict())  # the report names its preset
  done = os.path.join(out, 'timings.json')
  timings = common.read_json(done) if os.path.exists(done) else {}  # keep what --only skips
  names = [name for name in _ORDER if not only or name in only]
  jobs = min(jobs, len(names))
  t0 = time.perf_counter()
  if jobs == 1:
    for name in names:
      timings[name] = _experiment(name, cfg, out)
      print(f'{name}: {timings[name]:.0f} s', flush=True)
  else:
    # Spawned, not forked: a fork would copy this process's JAX and TensorFlow thread state.
    context = multiprocessing.get_context('spawn')
    positions = context.Queue()
    for i in range(jobs):
      positions.put(i)
    # Processes sharing a GPU must not each reserve most of its memory.
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    with concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_worker_init,
        initargs=(positions, os.path.join(out, 'jax_cache'))) as pool:
      futures = {pool.submit(_experiment, name, cfg, out): name for name in names}
      for future in concurrent.futures.as_completed(futures):
        name = futures[future]
        try:
          timings[name] = future.result()
        except BaseException:
          for other in futures:  # the running ones finish (their runs are kept), no new ones
            other.cancel()
          raise
        print(f'{name}: {timings[name]:.0f} s', flush=True)
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
