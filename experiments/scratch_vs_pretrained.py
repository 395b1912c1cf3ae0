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
run: validation and test top-1) and curves.jsonl (validation top-1 at evenly spaced
evaluations); `gaps`, `table`, `findings` and `plot` turn them into the report, every
difference paired over seeds (the seeds of both inits share target subset and data order).
"""

import os

from ml_collections import ConfigDict

from experiments import common, stats

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
    result = common.run(config, workdir, eval_at=common.evenly(evals))
    rows.append({**fields, 'num_train': result['num_train'], 'epochs': result['epochs'],
                 'val_top1': result['top1'], 'top1': result['test_top1'],
                 'seconds': result['wall_seconds']})
    curves += [{**fields, 'epoch': m['epoch'], 'top1': m['top1']}
               for m in common.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
               if m['split'] == 'eval']
  common.write_jsonl(os.path.join(out, NAME, 'runs.jsonl'), rows)
  common.write_jsonl(os.path.join(out, NAME, 'curves.jsonl'), curves)
  return rows, curves


def parts(cfg) -> list[tuple[str, object, object]]:
  """`run`'s work as independent tasks for `run_all`: one per norm."""
  out = []
  for norm in cfg.scratch.norms:
    part = ConfigDict(cfg.to_dict())
    part.scratch.norms = (norm,)
    out.append((f'norm={norm}', run, part))
  return out


def gaps(rows: list[dict]) -> list[dict]:
  """Per (norm, size, schedule): test top-1 of both inits over seeds and the paired gap
  pretrained - scratch (`stats.Interval`s; `by_seed` keeps the per-seed gaps)."""
  groups = {}
  for r in rows:
    groups.setdefault((r['norm'], r['per_class'], r['schedule']), {}).setdefault(
        r['init'], {})[r['seed']] = r
  out = []
  for (norm, per_class, schedule), by_init in sorted(groups.items()):
    if set(by_init) != set(INITS):
      continue
    top1 = {init: {s: r['top1'] for s, r in by_init[init].items()} for init in INITS}
    first = next(iter(by_init['scratch'].values()))
    entry = dict(norm=norm, per_class=per_class, schedule=schedule,
                 num_train=first['num_train'], epochs=first['epochs'],
                 gap=stats.paired_difference(top1['pretrained'], top1['scratch'],
                                             labels=INITS[::-1]),
                 by_seed={s: top1['pretrained'][s] - top1['scratch'][s] for s in top1['scratch']})
    for init in INITS:
      entry[init] = stats.mean_interval(top1[init].values())
    out.append(entry)
  return out


def table(gap_rows: list[dict]) -> str:
  """Markdown: one row per (norm, size, schedule): test top-1 (%) of both inits, mean [95 % CI],
  and the paired gap (points) with its interval."""
  lines = ['| norm | target size | schedule | epochs | scratch top-1 (%) | pretrained top-1 (%) '
           '| gap, pretrained - scratch (points) |', '|---|---|---|---|---|---|---|']
  for g in gap_rows:
    size = common.size_label(g['per_class'], g['num_train'])
    lines.append(f'| {g["norm"]} | {size} | {g["schedule"]}x | {g["epochs"]:.1f} | '
                 f'{g["scratch"].format(1, 100)} | {g["pretrained"].format(1, 100)} | '
                 f'{g["gap"].format(1, 100)} |')
  return '\n'.join(lines)


def findings(gap_rows: list[dict]) -> list[str]:
  """Per (norm, size): the paired gap at each schedule in words, then He et al.'s two claims.

  He et al. (2019): with few target examples pretraining still helps at the longest schedule
  (gap > 0), and a longer schedule narrows the gap (gap at 1x minus gap at the longest > 0).
  """
  sentences = []
  settings = sorted({(g['norm'], g['per_class']) for g in gap_rows},
                    key=lambda k: (k[0], k[1] or 10**9))
  for norm, per_class in settings:
    gs = sorted((g for g in gap_rows if (g['norm'], g['per_class']) == (norm, per_class)),
                key=lambda g: g['schedule'])
    first, last = gs[0], gs[-1]
    where = f'{norm} norm, {common.size_label(per_class, first["num_train"])}'
    parts = [stats.sentence(f'pretrained at {g["schedule"]}x', f'scratch at {g["schedule"]}x',
                            g['gap']) for g in gs]
    text = f'{where}: ' + '; '.join(parts) + '.'
    helps = stats.claim('He et al. (small target)', stats.GREATER, last['gap'],
                        f'pretraining still helps at the longest schedule ({last["schedule"]}x)')
    text += ' ' + helps['sentence']
    if last is not first:
      narrows = stats.paired_difference(first['by_seed'], last['by_seed'])
      text += ' ' + stats.claim(
          'He et al. (schedule)', stats.GREATER, narrows,
          f'the gap at {first["schedule"]}x is larger than at {last["schedule"]}x')['sentence']
    sentences.append(text)
  return sentences


def plot(curves: list[dict], path: str):
  """Validation top-1 against epochs (mean over seeds): one panel per (norm, size); colour =
  schedule, dashed = scratch."""
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
    axes[i][0].set_ylabel('validation top-1 (%)')
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
