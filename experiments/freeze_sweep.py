"""Freeze-depth sweep: how many stages to fine-tune for a given amount of target data.

    python -m experiments.freeze_sweep --config=configs/experiments/digits.py --out=results/

The lecture's rule: with a few hundred target examples freeze most layers, with thousands tune
more, with tens of thousands tune all -- "see how many layers you need to tune, it is task
dependent". Following Yosinski et al. (2014, "How transferable are features in deep neural
networks?") the network is pretrained once on a source task (digits 0-4 by default) and
fine-tuned on a target task (digits 5-9) with its first k stages frozen, for every k from 0
(tune everything) to the largest (train the re-initialised head alone), at several target sizes
(N examples per class) and seeds. Writes OUT/freeze_sweep/runs.jsonl (one line per run);
`summarize`, `table` and `plot` turn it into the report's table and figure.
"""

import os

from experiments import common

NAME = 'freeze_sweep'


def runs(cfg, init_from: str):
  """(workdir name, trainer config, row fields) of every run of the sweep."""
  names = common.stage_names(cfg.target)
  depths = tuple(cfg.freeze.depths) or tuple(range(len(names)))
  for per_class in cfg.freeze.per_class:
    for depth in depths:
      for seed in cfg.freeze.seeds:
        config = common.target_config(cfg, per_class=per_class, seed=seed, depth=depth,
                                      steps=cfg.freeze.steps, init_from=init_from)
        fields = dict(per_class=per_class, depth=depth, seed=seed,
                      frozen=','.join(names[:depth]) or '-')
        yield f'n{per_class}_d{depth}_s{seed}', config, fields


def run(cfg, out: str) -> list[dict]:
  """Pretrains (once), runs the sweep (skipping finished runs), writes and returns the rows."""
  init_from = common.pretrained(cfg, out)
  rows = []
  for name, config, fields in common.progress(list(runs(cfg, init_from)), NAME):
    result = common.run(config, os.path.join(out, NAME, 'runs', name))
    rows.append({**fields, 'num_train': result['num_train'], 'top1': result['top1'],
                 'seconds': result['wall_seconds']})
  common.write_jsonl(os.path.join(out, NAME, 'runs.jsonl'), rows)
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Mean and std of target top-1 over seeds, one row per (per_class, depth), sorted."""
  groups = {}
  for r in rows:
    groups.setdefault((r['per_class'], r['depth']), []).append(r)
  out = []
  for (per_class, depth), group in sorted(groups.items()):
    mean, std = common.mean_std([r['top1'] for r in group])
    out.append(dict(per_class=per_class, depth=depth, frozen=group[0]['frozen'],
                    num_train=group[0]['num_train'], mean=mean, std=std, seeds=len(group)))
  return out


def best_depths(summary: list[dict]) -> dict[int, int]:
  """The freeze depth of highest mean accuracy for each target size (ties: the deeper)."""
  best = {}
  for r in summary:
    key = (r['mean'], r['depth'])
    if r['per_class'] not in best or key > best[r['per_class']][0]:
      best[r['per_class']] = (key, r['depth'])
  return {n: depth for n, (_, depth) in best.items()}


def _size(per_class: int, num_train: int) -> str:
  return f'{per_class}/class ({num_train})' if per_class else f'all ({num_train})'


def table(summary: list[dict]) -> str:
  """Markdown: rows are freeze depths, columns target sizes, cells mean ± std top-1 (%)."""
  sizes = sorted({(r['per_class'] or 10**9, r['per_class'], r['num_train']) for r in summary})
  depths = sorted({(r['depth'], r['frozen']) for r in summary})
  cell = {(r['per_class'], r['depth']): r for r in summary}
  best = best_depths(summary)
  lines = ['| freeze depth (frozen stages) | ' +
           ' | '.join(_size(n, m) for _, n, m in sizes) + ' |',
           '|---' * (len(sizes) + 1) + '|']
  for depth, frozen in depths:
    cells = []
    for _, n, _ in sizes:
      r = cell.get((n, depth))
      text = f'{100 * r["mean"]:.1f} ± {100 * r["std"]:.1f}' if r else '–'
      cells.append(f'**{text}**' if r and best[n] == depth else text)
    lines.append(f'| {depth} ({frozen}) | ' + ' | '.join(cells) + ' |')
  lines.append('| best depth | ' + ' | '.join(str(best[n]) for _, n, _ in sizes) + ' |')
  return '\n'.join(lines)


def plot(summary: list[dict], path: str):
  """Target accuracy against freeze depth, one line (mean ± std over seeds) per target size."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for n in sorted({r['per_class'] for r in summary}, key=lambda n: n or 10**9):
    rs = sorted((r for r in summary if r['per_class'] == n), key=lambda r: r['depth'])
    ax.errorbar([r['depth'] for r in rs], [100 * r['mean'] for r in rs],
                yerr=[100 * r['std'] for r in rs], marker='o', capsize=3,
                label=_size(n, rs[0]['num_train']))
  depths = sorted({(r['depth'], r['frozen'].split(',')[-1]) for r in summary})
  ax.set_xticks([d for d, _ in depths], [f'{d}\n{last}' for d, last in depths], fontsize=8)
  ax.set_xlabel('freeze depth (last frozen stage)')
  ax.set_ylabel('target top-1 (%)')
  ax.set_title('Fine-tuning with the first k stages frozen')
  ax.grid(alpha=0.3)
  ax.legend(title='target size')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  common.main(lambda cfg, out: print(table(summarize(run(cfg, out)))))
