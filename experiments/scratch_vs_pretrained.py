"""Pretraining vs training from scratch at several schedule lengths (He, Girshick & Dollar,
"Rethinking ImageNet Pre-training", ICCV 2019).

    python -m experiments.scratch_vs_pretrained --config=configs/experiments/digits.py \
        --out=results/

He et al. find that a network trained from scratch catches up with a fine-tuned pretrained one
when the schedule is long enough (and normalisation does not depend on large batches: they use
GroupNorm), except when the target data are few. Here both start from the same architecture and
train on the same target view for 1x, 2x, 4x, ... a base number of steps (cosine schedule each,
so a 4x run is its own run, not the first quarter of a longer one), at several target sizes, with
BatchNorm and with GroupNorm. Writes OUT/scratch_vs_pretrained/runs.jsonl (final accuracy per
run) and curves.jsonl (accuracy at evenly spaced evaluations); `gaps`, `table`, `findings` and
`plot` turn them into the report.
"""

import os

from experiments import common

NAME = 'scratch_vs_pretrained'
INITS = ('scratch', 'pretrained')


def runs(cfg, init_from: dict[str, str]):
  """(workdir name, trainer config, row fields, evaluations) of every run."""
  sc = cfg.scratch
  for norm in sc.norms:
    for per_class in sc.per_class:
      for schedule in sc.schedules:
        for init in INITS:
          for seed in sc.seeds:
            config = common.target_config(
                cfg, per_class=per_class, seed=seed, steps=sc.steps_1x * schedule, norm=norm,
                init_from=init_from[norm] if init == 'pretrained' else '')
            fields = dict(norm=norm, per_class=per_class, schedule=schedule, init=init,
                          seed=seed)
            name = f'{norm}_n{per_class}_x{schedule}_{init}_s{seed}'
            yield name, config, fields, sc.num_evals * schedule


def run(cfg, out: str) -> tuple[list[dict], list[dict]]:
  """Pretrains once per norm, runs every configuration, writes and returns (runs, curves)."""
  init_from = {norm: common.pretrained(cfg, out, norm) for norm in cfg.scratch.norms}
  rows, curves = [], []
  for name, config, fields, evals in common.progress(list(runs(cfg, init_from)), NAME):
    workdir = os.path.join(out, NAME, 'runs', name)
    result = common.run(config, workdir, num_evals=evals)
    rows.append({**fields, 'num_train': result['num_train'], 'epochs': result['epochs'],
                 'top1': result['top1'], 'seconds': result['wall_seconds']})
    curves += [{**fields, 'epoch': m['epoch'], 'top1': m['top1']}
               for m in common.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
               if m['split'] == 'eval']
  common.write_jsonl(os.path.join(out, NAME, 'runs.jsonl'), rows)
  common.write_jsonl(os.path.join(out, NAME, 'curves.jsonl'), curves)
  return rows, curves


def gaps(rows: list[dict]) -> list[dict]:
  """Per (norm, size, schedule): mean±std top-1 of both inits and the gap pretrained - scratch."""
  groups = {}
  for r in rows:
    groups.setdefault((r['norm'], r['per_class'], r['schedule']), {}).setdefault(
        r['init'], []).append(r)
  out = []
  for (norm, per_class, schedule), by_init in sorted(groups.items()):
    if set(by_init) != set(INITS):
      continue
    entry = dict(norm=norm, per_class=per_class, schedule=schedule,
                 num_train=by_init['scratch'][0]['num_train'],
                 epochs=by_init['scratch'][0]['epochs'])
    for init in INITS:
      entry[init], entry[init + '_std'] = common.mean_std([r['top1'] for r in by_init[init]])
    entry['gap'] = entry['pretrained'] - entry['scratch']
    out.append(entry)
  return out


def _size(per_class: int, num_train: int) -> str:
  return f'{per_class}/class ({num_train})' if per_class else f'all ({num_train})'


def table(gap_rows: list[dict]) -> str:
  """Markdown: one row per (norm, size, schedule) with both accuracies and the gap (points)."""
  lines = ['| norm | target size | schedule | epochs | scratch top-1 (%) | pretrained top-1 (%) '
           '| gap (points) |', '|---|---|---|---|---|---|---|']
  for g in gap_rows:
    lines.append(f'| {g["norm"]} | {_size(g["per_class"], g["num_train"])} | {g["schedule"]}x | '
                 f'{g["epochs"]:.1f} | {100 * g["scratch"]:.1f} ± {100 * g["scratch_std"]:.1f} | '
                 f'{100 * g["pretrained"]:.1f} ± {100 * g["pretrained_std"]:.1f} | '
                 f'{100 * g["gap"]:+.1f} |')
  return '\n'.join(lines)


def findings(gap_rows: list[dict], tolerance: float = 0.01) -> list[str]:
  """One sentence per (norm, size) saying what the gaps show, computed from the numbers.

  Scratch "catches up" at the first schedule whose gap is at most `tolerance` (plus the larger
  seed std, so noise is not read as a gap).
  """
  sentences = []
  settings = sorted({(g['norm'], g['per_class']) for g in gap_rows},
                    key=lambda k: (k[0], k[1] or 10**9))
  for norm, per_class in settings:
    gs = sorted((g for g in gap_rows if (g['norm'], g['per_class']) == (norm, per_class)),
                key=lambda g: g['schedule'])
    first, last = gs[0], gs[-1]
    listed = ', '.join(f'{100 * g["gap"]:+.1f} at {g["schedule"]}x' for g in gs)
    where = f'With {norm} norm and {_size(per_class, first["num_train"])} target examples'
    caught = [g for g in gs if g['gap'] <= tolerance + max(g['scratch_std'], g['pretrained_std'])]
    if caught and caught[0] is first:
      verdict = 'scratch is already level with (or ahead of) pretraining at the shortest schedule'
    elif caught:
      verdict = f'scratch catches up with pretraining by {caught[0]["schedule"]}x'
    elif last['gap'] < first['gap']:
      share = 1 - last['gap'] / first['gap'] if first['gap'] > 0 else 0.0
      verdict = (f'a longer schedule closes {100 * share:.0f}% of the gap but scratch does not '
                 f'catch up within {last["schedule"]}x')
    else:
      verdict = f'the gap does not shrink with a longer schedule (up to {last["schedule"]}x)'
    sentences.append(f'{where}, pretrained minus scratch top-1 is {listed} points: {verdict}.')
  return sentences


def plot(curves: list[dict], path: str):
  """Top-1 against epochs: one panel per (norm, size); colour = schedule, dashed = scratch."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  norms = sorted({c['norm'] for c in curves})
  sizes = sorted({c['per_class'] for c in curves}, key=lambda n: n or 10**9)
  schedules = sorted({c['schedule'] for c in curves})
  fig, axes = plt.subplots(len(norms), len(sizes), figsize=(4.5 * len(sizes), 3.4 * len(norms)),
                           squeeze=False, sharey=True)
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, norm in enumerate(norms):
    for j, per_class in enumerate(sizes):
      ax = axes[i][j]
      for k, schedule in enumerate(schedules):
        for init, style in (('pretrained', '-'), ('scratch', '--')):
          pts = _mean_curve(curves, norm, per_class, schedule, init)
          if pts:
            ax.plot(*zip(*pts), style, marker='.', color=colours[k % len(colours)],
                    label=f'{init} {schedule}x')
      ax.set_title(f'{norm} norm, {per_class or "all"}' + ('/class' if per_class else ''))
      ax.set_xlabel('epochs')
      ax.grid(alpha=0.3)
    axes[i][0].set_ylabel('target top-1 (%)')
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _mean_curve(curves, norm, per_class, schedule, init) -> list[tuple[float, float]]:
  """(epoch, mean top-1 in %) over seeds of one configuration."""
  by_epoch = {}
  for c in curves:
    if (c['norm'], c['per_class'], c['schedule'], c['init']) == (norm, per_class, schedule, init):
      by_epoch.setdefault(round(c['epoch'], 6), []).append(c['top1'])
  return [(e, 100 * sum(v) / len(v)) for e, v in sorted(by_epoch.items())]


if __name__ == '__main__':
  common.main(lambda cfg, out: print(table(gaps(run(cfg, out)[0]))))
