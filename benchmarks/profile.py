"""Where the trainer's train step spends its time on XLA:CPU, per op category.

    python -m benchmarks.profile --cifar_stem [--steps=3] [model flags] [--out=FILE.jsonl]

The step (`cnn_arch.train.parallel_steps`) is timed (median of --steps after a warm-up), then
--steps steps are traced with `jax.profiler` and XLA:CPU's per-op events summed by category
(the HLO name without its `.N` suffix), largest first: thread ms and covered wall ms per step.
XLA:CPU's trace times fusions, copies and YNNPACK calls, but an Eigen convolution's event only
marks its launch (the kernel runs asynchronously), so the step time the timed ops leave
uncovered, `untimed_ms` in the summary row, is the convolution kernels and any idle time.
"""

import collections
import glob
import os
import re
import tempfile

import jax
import numpy as np

from benchmarks import common


def xla_cpu_events(profile):
  """(op name, start ns, duration ns) of the XLA ops in a `jax.profiler.ProfileData`'s host plane.

  XLA:CPU records one event per executed HLO instruction on its thread-pool lines (`tf_XLA*`),
  next to runtime spans (`ThunkExecutor::Execute`, `end: ...`) that are not ops and are skipped.
  """
  plane = profile.find_plane_with_name('/host:CPU')
  return [(e.name, e.start_ns, e.duration_ns) for line in plane.lines
          if line.name.startswith('tf_XLA') for e in line.events
          if re.fullmatch(r'[\w.-]+', e.name)]


def _covered_ns(intervals):
  """Length of the union of (start, end) intervals."""
  total, end = 0.0, -np.inf
  for s, e in sorted(intervals):
    total += max(0.0, e - max(s, end))
    end = max(end, e)
  return total


def op_times(events, steps):
  """Per op category (HLO name without its `.N` suffix, e.g. `transpose_copy_fusion`), per step:
  {category: (thread ms, wall ms its events cover, count)}, and the wall ms all ops cover."""
  by_op = collections.defaultdict(list)
  for name, start, duration in events:
    by_op[re.sub(r'\.\d+$', '', name)].append((start, start + duration))
  per_step = lambda ns: ns / steps / 1e6
  ops = {op: (per_step(sum(e - s for s, e in iv)), per_step(_covered_ns(iv)), len(iv) / steps)
         for op, iv in by_op.items()}
  return ops, per_step(_covered_ns([iv for ivs in by_op.values() for iv in ivs]))


def main(argv=None):
  args = common.parse(common.parser(__doc__, __spec__.name, steps=3), argv)
  if jax.default_backend() != 'cpu':
    raise SystemExit(f'benchmarks.profile reads XLA:CPU traces; on {jax.default_backend()}, '
                     'record one with jax.profiler.trace and open it in TensorBoard/XProf.')
  bench = common.TrainerStep(common.trainer_config(args), args.xla_options, infer=False)
  step_ms = 1e3 * common.median_s(bench.train, args.steps)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        bench.train()
    path, = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
    events = xla_cpu_events(jax.profiler.ProfileData.from_file(path))
  ops, ops_wall_ms = op_times(events, args.steps)
  info = {k: v for k, v in bench.info().items()
          if k in ('model', 'batch', 'image_size', 'conv', 'freeze_depth', 'norm', 'width')}
  rows = [dict(info, suite='profile', op=op, thread_ms=thread_ms, wall_ms=wall_ms, per_step=count)
          for op, (thread_ms, wall_ms, count) in sorted(ops.items(), key=lambda kv: -kv[1][0])
          if thread_ms >= 0.5]
  common.report(rows, ['op', 'thread_ms', 'wall_ms', 'per_step'], args.out,
                title=f'profile: {info["model"]}, batch {info["batch"]}, per step')
  summary = dict(info, suite='profile', step_ms=step_ms, ops_wall_ms=ops_wall_ms,
                 untimed_ms=step_ms - ops_wall_ms, **common.machine())
  common.report([summary], ['step_ms', 'ops_wall_ms', 'untimed_ms'], args.out)
  return rows, summary


if __name__ == '__main__':
  main()
