"""Pretraining vs training from scratch at several schedule lengths (He, Girshick & Dollar,
"Rethinking ImageNet Pre-training", ICCV 2019).

    python -m experiments.scratch_vs_pretrained --config=configs/experiments/digits.py \
        --out=results/

He et al. find that a network trained from scratch catches up with a fine-tuned pretrained one
when the schedule is long enough (and normalisation does not depend on large batches: they use
GroupNorm), except when the target data are few. Here scratch and pretrained runs share the
architecture and train on the same target view for 1x, 2x, 4x, ... a base number of steps
(cosine schedule each, so a 4x run is its own run, not the first quarter of a longer one), at
several target sizes, with BatchNorm and with GroupNorm. Two sources: MNIST digits 0-4 (natural
images of the target's domain) and, at the norms of `scratch.fractaldb_norms`, FractalDB
(Kataoka et al., ACCV 2020, "Pre-training without Natural Images": formula-driven images,
`cnn_arch.fractaldb`). Each (norm, size, init) takes the learning rate that its shortest
schedule selects on validation. Writes OUT/scratch_vs_pretrained/runs.jsonl (final accuracy per
run: validation and test top-1, lr), curves.jsonl (validation top-1 at evenly spaced
evaluations) and lr_grid.jsonl; `gaps`, `table`, `findings` and `plot` turn them into the
report, every difference paired over seeds (the seeds of all inits share target subset and data
order).
"""

import os

from ml_collections import ConfigDict

from experiments import common, stats

NAME = 'scratch_vs_pretrained'
INITS = ('scratch', 'pretrained', 'fractaldb')
SOURCES = {'pretrained': 'source', 'fractaldb': 'fractaldb'}  # init -> the cfg section it trains
LABELS = {'scratch': 'scratch', 'pretrained': 'MNIST 0-4', 'fractaldb': 'FractalDB'}


def inits(cfg, norm: str) -> tuple[str, ...]:
  """The inits compared at `norm`: scratch, MNIST-pretrained, and FractalDB-pretrained where
  `scratch.fractaldb_norms` has `norm`."""
  return INITS if norm in cfg.scratch.fractaldb_norms else INITS[:2]


def runs(cfg, init_from: dict[tuple[str, str], str]):
  """(cell, workdir name, trainer config, row fields, run arguments) of every run. A cell is
  one (norm, size, init); its runs are the schedules, shortest first, times the seeds, so
  `common.run_tuned` selects the cell's learning rate at the shortest schedule."""
  sc = cfg.scratch
  for norm in sc.norms:
    for per_class in sc.per_class:
      for init in inits(cfg, norm):
        for schedule in sorted(sc.schedules):
          for seed in sc.seeds:
            config = common.target_config(
                cfg, per_class=per_class, seed=seed, steps=sc.steps_1x * schedule, norm=norm,
                init_from=init_from.get((norm, init), ''))
            fields = dict(norm=norm, per_class=per_class, schedule=schedule, init=init,
                          seed=seed)
            yield ((norm, per_class, init), f'{norm}_n{per_class}_x{schedule}_{init}_s{seed}',
                   config, fields, dict(eval_at=common.evenly(sc.num_evals * schedule)))


def run(cfg, out: str) -> tuple[list[dict], list[dict]]:
  """Pretrains once per (norm, source), runs every configuration at its cell's learning rate,
  writes and returns (runs, curves)."""
  tune = common.tuning(cfg, NAME)
  init_from = {(norm, init): common.pretrained(cfg, out, norm, SOURCES[init])
               for norm in cfg.scratch.norms for init in inits(cfg, norm)[1:]}
  done, grid = common.run_tuned(list(runs(cfg, init_from)), tune, os.path.join(out, NAME, 'runs'),
                                NAME)
  rows, curves = [], []
  for fields, result, workdir in done:
    rows.append({**fields, 'num_train': result['num_train'], 'epochs': result['epochs'],
                 'val_top1': result['top1'], 'top1': result['test_top1'],
                 'seconds': result['wall_seconds']})
    curves += [{**fields, 'epoch': m['epoch'], 'top1': m['top1']}
               for m in common.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
               if m['split'] == 'eval']
  common.write_jsonl(os.path.join(out, NAME, 'runs.jsonl'), rows)
  common.write_jsonl(os.path.join(out, NAME, 'curves.jsonl'), curves)
  common.write_jsonl(os.path.join(out, NAME, 'lr_grid.jsonl'), grid)
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
  """Per (norm, size, schedule): test top-1 of each init over seeds (`stats.Interval`s, with
  its learning rate under 'lr'), the paired gap pretrained - scratch (`gap`; `by_seed` keeps
  the per-seed gaps) and, where FractalDB ran, fractaldb - scratch (`fractal_gap`) and
  pretrained - fractaldb (`natural_gap`)."""
  groups = {}
  for r in rows:
    groups.setdefault((r['norm'], r['per_class'], r['schedule']), {}).setdefault(
        r['init'], {})[r['seed']] = r
  out = []
  for (norm, per_class, schedule), by_init in sorted(groups.items()):
    if not {'scratch', 'pretrained'} <= set(by_init):
      continue
    top1 = {init: {s: r['top1'] for s, r in runs.items()} for init, runs in by_init.items()}
    first = next(iter(by_init['scratch'].values()))
    diff = lambda a, b: stats.paired_difference(top1[a], top1[b], labels=(a, b))
    entry = dict(norm=norm, per_class=per_class, schedule=schedule,
                 num_train=first['num_train'], epochs=first['epochs'],
                 gap=diff('pretrained', 'scratch'),
                 by_seed={s: top1['pretrained'][s] - top1['scratch'][s] for s in top1['scratch']},
                 lr={init: next(iter(runs.values())).get('lr') for init, runs in by_init.items()})
    if 'fractaldb' in by_init:
      entry.update(fractal_gap=diff('fractaldb', 'scratch'),
                   natural_gap=diff('pretrained', 'fractaldb'))
    for init in by_init:
      entry[init] = stats.mean_interval(top1[init].values())
    out.append(entry)
  return out


def table(gap_rows: list[dict]) -> str:
  """Markdown: one row per (norm, size, schedule): test top-1 (%) of each init, mean [95 % CI],
  with the learning rate chosen on validation, and the paired gaps (points) to scratch."""
  inits = [i for i in INITS if any(i in g for g in gap_rows)]
  gaps = [('gap', 'MNIST 0-4')] + [('fractal_gap', 'FractalDB')] * ('fractaldb' in inits)
  lines = ['| norm | target size | schedule | epochs | ' +
           ' | '.join(f'{LABELS[i]} top-1 (%)' for i in inits) + ' | ' +
           ' | '.join(f'gap, {label} - scratch (points)' for _, label in gaps) + ' |',
           '|---' * (len(inits) + len(gaps) + 4) + '|']
  for g in gap_rows:
    size = common.size_label(g['per_class'], g['num_train'])
    cells = [g[i].format(1, 100) + common.lr_label(g['lr'][i]) if i in g else '–' for i in inits]
    cells += [g[k].format(1, 100) if k in g else '–' for k, _ in gaps]
    lines.append(f'| {g["norm"]} | {size} | {g["schedule"]}x | {g["epochs"]:.1f} | ' +
                 ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def findings(gap_rows: list[dict]) -> list[str]:
  """Per (norm, size): the paired gaps at each schedule in words, then the claims.

  He et al. (2019): with few target examples pretraining still helps at the longest schedule
  (gap > 0), and a longer schedule narrows the gap (gap at 1x minus gap at the longest > 0).
  Kataoka et al. (2020), where FractalDB ran, at the shortest schedule: FractalDB pretraining
  beats training from scratch, and falls short of pretraining on natural images (here MNIST
  0-4, the target's own domain).
  """
  sentences = []
  settings = sorted({(g['norm'], g['per_class']) for g in gap_rows},
                    key=lambda k: (k[0], k[1] or 10**9))
  for norm, per_class in settings:
    gs = sorted((g for g in gap_rows if (g['norm'], g['per_class']) == (norm, per_class)),
                key=lambda g: g['schedule'])
    first, last = gs[0], gs[-1]
    where = f'{norm} norm, {common.size_label(per_class, first["num_train"])}'
    parts = [stats.sentence(f'MNIST-pretrained at {g["schedule"]}x',
                            f'scratch at {g["schedule"]}x', g['gap']) for g in gs]
    parts += [stats.sentence(f'FractalDB-pretrained at {g["schedule"]}x',
                             f'scratch at {g["schedule"]}x', g['fractal_gap'])
              for g in gs if 'fractal_gap' in g]
    text = f'{where}: ' + '; '.join(parts) + '.'
    helps = stats.claim('He et al. (small target)', stats.GREATER, last['gap'],
                        f'pretraining still helps at the longest schedule ({last["schedule"]}x)')
    text += ' ' + helps['sentence']
    if last is not first:
      narrows = stats.paired_difference(first['by_seed'], last['by_seed'])
      text += ' ' + stats.claim(
          'He et al. (schedule)', stats.GREATER, narrows,
          f'the gap at {first["schedule"]}x is larger than at {last["schedule"]}x')['sentence']
    if 'fractal_gap' in first:
      at = f'{first["schedule"]}x'
      text += ' ' + stats.claim('Kataoka et al. (against scratch)', stats.GREATER,
                                first['fractal_gap'],
                                f'FractalDB pretraining beats training from scratch ({at})'
                                )['sentence']
      text += ' ' + stats.claim('Kataoka et al. (against natural images)', stats.GREATER,
                                first['natural_gap'],
                                f'pretraining on MNIST 0-4 beats pretraining on FractalDB ({at})'
                                )['sentence']
    sentences.append(text)
  return sentences


def plot(curves: list[dict], path: str):
  """Validation top-1 against epochs (mean over seeds): one panel per (norm, size); colour =
  schedule; solid/circles MNIST-pretrained, dotted/triangles FractalDB-pretrained,
  dashed/squares scratch."""
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
        for init, style, marker in (('pretrained', '-', 'o'), ('fractaldb', ':', '^'),
                                    ('scratch', '--', 's')):
          pts = _mean_curve(curves, norm, per_class, schedule, init)
          if pts:  # markers tell the inits apart where a schedule has a single evaluation
            ax.plot(*zip(*pts), style, marker=marker, ms=5, color=colours[k % len(colours)],
                    label=f'{LABELS[init]} {schedule}x')
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
