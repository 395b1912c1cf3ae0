"""All six experiments and the report, in one resumable command.

    python -m experiments.run_all --out=results/ [--preset=full]
        [--config=configs/experiments/digits.py]

Runs the freeze-depth sweep, Yosinski et al.'s transfer arms, surgical fine-tuning, scratch vs
pretrained, features in L2 space and the architecture comparison, then renders OUT/report.md.
`--preset=full` is the config file's `full` preset (`--config=...digits.py:full`). Finished runs (a
directory holding results.json) are not redone, so after an interruption the same command
continues; compiled programs persist in OUT/jax_cache. `--only=freeze_sweep,features_l2` runs
a subset (the report covers what exists).
"""

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


def run_all(cfg, out: str, only: tuple[str, ...] = ()) -> str:
  """Runs the selected experiments (all by default) and renders the report; returns its path."""
  unknown = set(only) - set(EXPERIMENTS)
  if unknown:
    raise ValueError(f'Unknown experiment(s) {sorted(unknown)}; choose from {list(EXPERIMENTS)}.')
  os.makedirs(out, exist_ok=True)
  common.write_json(os.path.join(out, 'config.json'), cfg.to_dict())  # the report names its preset
  done = os.path.join(out, 'timings.json')
  timings = common.read_json(done) if os.path.exists(done) else {}  # keep what --only skips
  for name, fn in EXPERIMENTS.items():
    if only and name not in only:
      continue
    t = time.perf_counter()
    fn(cfg, out)
    timings[name] = time.perf_counter() - t
    print(f'{name}: {timings[name]:.0f} s', flush=True)
  path = report.render(out)
  common.write_json(done, timings)
  return path


def main():
  from absl import flags  # pylint: disable=g-import-not-at-top
  only = flags.DEFINE_list('only', [], f'Subset of {list(EXPERIMENTS)}.')
  t0 = time.perf_counter()
  common.main(lambda cfg, out: print(f'{run_all(cfg, out, tuple(only.value))} written in '
                                     f'{time.perf_counter() - t0:.0f} s'))


if __name__ == '__main__':
  main()
