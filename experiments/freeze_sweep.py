"""Freeze-depth sweep: how many stages to fine-tune for a given amount of target data.

    python -m experiments.freeze_sweep --config=configs/experiments/digits.py --out=results/

The lecture's rule: with a few hundred target examples freeze most layers, with thousands tune
more, with tens of thousands tune all -- "see how many layers you need to tune, it is task
dependent". Following Yosinski et al. (2014, "How transferable are features in deep neural
networks?") the network is pretrained once on a source task (digits 0-4 by default) and
fine-tuned on a target task (digits 5-9) with its first k stages frozen, for every k from 0
(tune everything) to the largest (train the head alone), at several target sizes
(N examples per class) and seeds. The head starts fresh at every depth (`common.target_config`
copies the body alone), so the deepest trains a new linear head on frozen features. Each
(size, depth) runs at the learning rate it selects on validation (`common.run_tuned`: a head on
frozen features wants another rate than full fine-tuning), and the best depth per size is
chosen on validation too; the test split gives every reported number. Writes
OUT/freeze_sweep/runs.jsonl (one line per run, `lr`, `val_top1` and test `top1`) and
lr_grid.jsonl (the validation scores of the grid); `summarize`,
`table`, `findings` and `plot` turn it into the report's table, sentences (paired over seeds,
`experiments.stats`) and figure.
"""

import os

from experiments import common, stats

NAME = 'freeze_sweep'


def runs(cfg, init_from: str):
  """(cell, workdir name, trainer config, row fields) of every run of the sweep; a cell is
  one (target size, depth), its runs the seeds."""
  names = common.stage_names(cfg.target)
  depths = tuple(cfg.freeze.depths) or tuple(range(len(names)))
  for per_class in cfg.freeze.per_class:
    for depth in depths:
      for seed in cfg.freeze.seeds:
        config = common.target_config(cfg, per_class=per_class, seed=seed, depth=depth,
                                      steps=cfg.freeze.steps, init_from=init_from)
        fields = dict(per_class=per_class, depth=depth, seed=seed,
                      frozen=','.join(names[:depth]) or '-')
        yield (per_class, depth), f'n{per_class}_d{depth}_s{seed}', config, fields


def run(cfg, out: str) -> list[dict]:
  """Pretrains (once), runs the sweep at each cell's learning rate (`common.run_tuned`;
  finished runs are skipped), writes and returns the rows."""
  tune = common.tuning(cfg, NAME)
  init_from = common.pretrained(cfg, out)
  done, grid = common.run_tuned(list(runs(cfg, init_from)), tune, os.path.join(out, NAME, 'runs'),
                                NAME)
  rows = [{**fields, 'num_train': result['num_train'], 'val_top1': result['top1'],
           'top1': result['test_top1'], 'seconds': result['wall_seconds']}
          for fields, result, _ in done]
  common.write_jsonl(os.path.join(out, NAME, 'runs.jsonl'), rows)
  common.write_jsonl(os.path.join(out, NAME, 'lr_grid.jsonl'), grid)
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Per (per_class, depth), sorted: test top-1 over seeds (`interval`, `by_seed`), the mean
  validation top-1 that selects the best depth, and the learning rate (`lr`) the cell chose."""
  groups = {}
  for r in rows:
    groups.setdefault((r['per_class'], r['depth']), []).append(r)
  out = []
  for (per_class, depth), group in sorted(groups.items()):
    interval = stats.mean_interval([r['top1'] for r in group])
    out.append(dict(per_class=per_class, depth=depth, frozen=group[0]['frozen'],
                    num_train=group[0]['num_train'], mean=interval.mean, interval=interval,
                    val_mean=sum(r['val_top1'] for r in group) / len(group),
                    by_seed={r['seed']: r['top1'] for r in group}, seeds=len(group),
                    lr=group[0].get('lr')))
  return out


def best_depths(summary: list[dict], frozen_only: bool = False) -> dict[int, int]:
  """The freeze depth of highest mean validation top-1 for each target size (ties: the deeper);
  `frozen_only` considers depths >= 1 only."""
  best = {}
  for r in summary:
    if frozen_only and r['depth'] == 0:
      continue
    key = (r['val_mean'], r['depth'])
    if r['per_class'] not in best or key > best[r['per_class']][0]:
      best[r['per_class']] = (key, r['depth'])
  return {n: depth for n, (_, depth) in best.items()}


def _sizes(summary):
  return sorted({(r['per_class'] or 10**9, r['per_class'], r['num_train']) for r in summary})


def table(summary: list[dict]) -> str:
  """Markdown: rows are freeze depths, columns target sizes, cells test top-1 (%) mean [95 % CI]
  and the learning rate chosen on validation; bold: the depth that validation selects."""
  sizes = _sizes(summary)
  depths = sorted({(r['depth'], r['frozen']) for r in summary})
  cell = {(r['per_class'], r['depth']): r for r in summary}
  best = best_depths(summary)
  lines = ['| freeze depth (frozen stages) | ' +
           ' | '.join(common.size_label(n, m) for _, n, m in sizes) + ' |',
           '|---' * (len(sizes) + 1) + '|']
  for depth, frozen in depths:
    cells = []
    for _, n, _ in sizes:
      r = cell.get((n, depth))
      text = r['interval'].format(1, 100) if r else '–'
      text = f'**{text}**' if r and best[n] == depth else text
      cells.append(text + common.lr_label(r['lr']) if r else text)
    lines.append(f'| {depth} ({frozen}) | ' + ' | '.join(cells) + ' |')
  lines.append('| best depth (validation) | ' + ' | '.join(str(best[n]) for _, n, _ in sizes) +
               ' |')
  return '\n'.join(lines)


def _diff(cell, n, a, b):
  return stats.paired_difference(cell[n, a]['by_seed'], cell[n, b]['by_seed'],
                                 labels=(f'depth {a}', f'depth {b}'))


def findings(summary: list[dict]) -> tuple[list[str], dict]:
  """Sentences on paired test differences, and the lecture's rule as a claim.

  Per target size: each depth k against k-1, and the validation-selected depth against full
  fine-tuning (k = 0). The lecture's rule ("small target: freeze more; large: tune more") holds
  when, at the smallest size, the best frozen depth beats full fine-tuning and, at the largest,
  full fine-tuning beats the best frozen depth; it does not hold when either difference has the
  opposite sign, and the data cannot tell otherwise.
  """
  cell = {(r['per_class'], r['depth']): r for r in summary}
  sizes = _sizes(summary)
  best, frozen_best = best_depths(summary), best_depths(summary, frozen_only=True)
  sentences = []
  for _, n, m in sizes:
    depths = sorted(d for (k, d) in cell if k == n)
    steps = [stats.sentence(f'depth {d}', f'depth {d - 1}', _diff(cell, n, d, d - 1))
             for d in depths[1:] if d - 1 in depths]
    text = f'{common.size_label(n, m)}: ' + '; '.join(steps)
    if best[n] != 0 and 0 in depths:
      text += ('. Selected depth against full fine-tuning: ' + stats.sentence(
          f'depth {best[n]}', 'depth 0', _diff(cell, n, best[n], 0)))
    sentences.append(text + '.')
  rule = None
  (_, small, _), (_, large, _) = sizes[0], sizes[-1]
  if small != large and small in frozen_best and (small, 0) in cell and (large, 0) in cell:
    a = stats.claim(f'At {small}/class', stats.GREATER,
                    _diff(cell, small, frozen_best[small], 0),
                    f'freezing (depth {frozen_best[small]}) beats tuning everything')
    b = stats.claim(f'at {common.size_label(large, sizes[-1][2])}', stats.GREATER,
                    _diff(cell, large, 0, frozen_best[large]),
                    f'tuning everything beats freezing (depth {frozen_best[large]})')
    statuses = {a['status'], b['status']}
    status = (stats.DOES_NOT_HOLD if stats.DOES_NOT_HOLD in statuses else
              stats.HOLDS if statuses == {stats.HOLDS} else stats.CANNOT_TELL_HERE)
    rule = dict(status=status, parts=[a, b],
                sentence=f'The lecture\'s rule "small target: freeze more, large target: tune '
                         f'more": {status}. {a["sentence"]} {b["sentence"][0].upper()}'
                         f'{b["sentence"][1:]}')
  return sentences, rule


def plot(summary: list[dict], path: str):
  """Test top-1 against freeze depth, one line per target size: mean over seeds, band = 95 % CI."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for n in sorted({r['per_class'] for r in summary}, key=lambda n: n or 10**9):
    rs = sorted((r for r in summary if r['per_class'] == n), key=lambda r: r['depth'])
    x = [r['depth'] for r in rs]
    line, = ax.plot(x, [100 * r['mean'] for r in rs], marker='o',
                    label=common.size_label(n, rs[0]['num_train']))
    lo = [100 * max(r['interval'].low, 0.0) for r in rs]  # n = 1: an unbounded interval
    hi = [100 * min(r['interval'].high, 1.0) for r in rs]
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
  depths = sorted({(r['depth'], r['frozen'].split(',')[-1]) for r in summary})
  ax.set_xticks([d for d, _ in depths], [f'{d}\n{last}' for d, last in depths], fontsize=8)
  ax.set_xlabel('freeze depth (last frozen stage)')
  ax.set_ylabel('target test top-1 (%)')
  ax.set_title('Fine-tuning with the first k stages frozen')
  ax.grid(alpha=0.3)
  ax.legend(title='target size')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  common.main(lambda cfg, out: print(table(summarize(run(cfg, out)))))
