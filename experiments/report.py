"""Renders OUT/report.md and its figures from the experiments' result files.

    python -m experiments.report --out=results/

Everything in the report is computed here from the JSON-lines files the experiments wrote
(freeze_sweep/runs.jsonl, scratch_vs_pretrained/{runs,curves}.jsonl, features_l2/results.json,
arch_compare/rows.jsonl), so re-rendering needs no training; sections whose files are missing
are left out. Figures are PNGs (matplotlib, Agg backend) in OUT/figures/.
"""

import os

from experiments import arch_compare, common, features_l2, freeze_sweep
from experiments import scratch_vs_pretrained as svp


def _freeze(out: str, figures: str) -> list[str]:
  summary = freeze_sweep.summarize(common.read_jsonl(
      os.path.join(out, freeze_sweep.NAME, 'runs.jsonl')))
  freeze_sweep.plot(summary, os.path.join(figures, 'freeze_sweep.png'))
  best = freeze_sweep.best_depths(summary)
  counts = {r['per_class']: r['num_train'] for r in summary}
  order = sorted(best, key=lambda n: n or 10**9)
  trend = ', '.join(f'{counts[n]} examples: depth {best[n]}' for n in order)
  depths = [best[n] for n in order]
  if len(depths) < 2:
    verdict = 'one target size only, so no trend'
  elif depths == sorted(depths, reverse=True) and depths[0] > depths[-1]:
    verdict = ('the best depth falls as the target set grows, as the lecture\'s rule says '
               '(fewer examples: freeze more)')
  elif len(set(depths)) == 1:
    verdict = 'the best depth does not depend on the target size here, unlike the lecture\'s rule'
  else:
    verdict = 'the best depth does not fall monotonically with the target size here'
  return ['## 1. Freeze-depth sweep', '',
          'Target top-1 (%, mean ± std over seeds) by freeze depth (rows) and target size '
          '(columns); bold: best depth per size.', '', freeze_sweep.table(summary), '',
          f'Best depth by target size: {trend}; {verdict}.', '',
          '![accuracy against freeze depth](figures/freeze_sweep.png)', '']


def _scratch(out: str, figures: str) -> list[str]:
  base = os.path.join(out, svp.NAME)
  rows = common.read_jsonl(os.path.join(base, 'runs.jsonl'))
  svp.plot(common.read_jsonl(os.path.join(base, 'curves.jsonl')),
           os.path.join(figures, 'scratch_vs_pretrained.png'))
  gaps = svp.gaps(rows)
  return (['## 2. Pretraining vs training from scratch', '', svp.table(gaps), ''] +
          [f'- {s}' for s in svp.findings(gaps)] +
          ['', '![accuracy against epochs](figures/scratch_vs_pretrained.png)', ''])


def _features(out: str, figures: str) -> list[str]:
  base = os.path.join(out, features_l2.NAME)
  results = common.read_json(os.path.join(base, 'results.json'))
  grid = os.path.join(base, 'knn_grid.png')
  lines = ['## 3. Features in L2 space', '', features_l2.table(results), '',
           features_l2.finding(results), '']
  if os.path.exists(grid):
    _copy(grid, os.path.join(figures, 'knn_grid.png'))
    lines += ['Nearest training images (L2, pre-logit features) of test images; green titles: '
              'same label as the query.', '', '![nearest neighbours](figures/knn_grid.png)', '']
  return lines


def _arch(out: str, figures: str) -> list[str]:
  del figures
  rows = common.read_jsonl(os.path.join(out, arch_compare.NAME, 'rows.jsonl'))
  return ['## 4. Architecture comparison', '',
          'Reduced widths and small inputs so that every family trains within the CPU budget; '
          'images/s are medians of timed train/eval steps on this machine.', '',
          arch_compare.table(rows), '', arch_compare.resnext_finding(rows), '']


def _copy(src: str, dst: str):
  with open(src, 'rb') as f, open(dst, 'wb') as g:
    g.write(f.read())


SECTIONS = ((freeze_sweep.NAME, 'runs.jsonl', _freeze), (svp.NAME, 'runs.jsonl', _scratch),
            (features_l2.NAME, 'results.json', _features),
            (arch_compare.NAME, 'rows.jsonl', _arch))


def render(out: str) -> str:
  """Writes OUT/report.md (and OUT/figures/*.png); returns the path of report.md."""
  figures = os.path.join(out, 'figures')
  os.makedirs(figures, exist_ok=True)
  lines = ['# cnn_arch experiments', '']
  for name, marker, section in SECTIONS:
    if os.path.exists(os.path.join(out, name, marker)):
      lines += section(out, figures)
  path = os.path.join(out, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path


if __name__ == '__main__':
  common.main(lambda cfg, out: print(render(out)))
