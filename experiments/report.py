"""Renders OUT/report.md and its figures from the experiments' result files.

    python -m experiments.report --out=results/

Everything in the report is computed here from the JSON-lines files the experiments wrote
(freeze_sweep/runs.jsonl, transfer_arms/runs.jsonl, surgical/runs.jsonl,
scratch_vs_pretrained/{runs,curves}.jsonl, features_l2/results.json, arch_compare/rows.jsonl)
and the config that `run_all` stored (config.json: the preset), so re-rendering needs no
training; sections whose files are missing are left out. Figures are PNGs (matplotlib, Agg
backend) in OUT/figures/.
"""

import os

from cnn_arch import fractaldb
from experiments import arch_compare, common, features_l2, freeze_sweep, surgical, transfer_arms
from experiments import scratch_vs_pretrained as svp


def _freeze(out: str, figures: str) -> list[str]:
  summary = freeze_sweep.summarize(common.read_jsonl(
      os.path.join(out, freeze_sweep.NAME, 'runs.jsonl')))
  freeze_sweep.plot(summary, os.path.join(figures, 'freeze_sweep.png'))
  sentences, rule = freeze_sweep.findings(summary)
  seeds = max(r['seeds'] for r in summary)
  return (['## 1. Freeze-depth sweep', '',
           f'Target test top-1 (%, mean [95 % CI] over {seeds} seeds) by freeze depth (rows) '
           'and target size (columns); bold: the depth that validation top-1 selects. '
           'Differences below are paired over seeds.', '', freeze_sweep.table(summary), ''] +
          [f'- {s}' for s in sentences] + [''] +
          ([rule['sentence'], ''] if rule else []) +
          ['![accuracy against freeze depth](figures/freeze_sweep.png)', ''])


def _transfer(out: str, figures: str) -> list[str]:
  rows = common.read_jsonl(os.path.join(out, transfer_arms.NAME, 'runs.jsonl'))
  cells = transfer_arms.summarize(rows)
  transfer_arms.plot(cells, os.path.join(figures, 'transfer_arms.png'))
  sentences, claims = transfer_arms.findings(cells)
  base = cells[('base B', 0)]
  return (['## 2. Transfer arms (Yosinski et al. 2014)', '',
           f'Target test top-1 (%, mean [95 % CI] over {base["interval"].n} seeds) at '
           f'{common.size_label(rows[0]["per_class"], base["num_train"])}. k stages copied from '
           'base B (BnB, frozen), from the source network (AnB, frozen) or from the source and '
           'fine-tuned (AnB+); the stages above k and the head start fresh. Differences are '
           'paired over seeds.', '', transfer_arms.table(cells), ''] +
          [f'- {s}' for s in sentences] + [''] + [f'- {c["sentence"]}' for c in claims] +
          ['', '![accuracy against copied depth](figures/transfer_arms.png)', ''])


def _surgical(out: str, figures: str) -> list[str]:
  rows = common.read_jsonl(os.path.join(out, surgical.NAME, 'runs.jsonl'))
  cells = surgical.summarize(rows)
  surgical.plot(cells, os.path.join(figures, 'surgical.png'))
  sentences, claims = surgical.findings(cells)
  first = next(iter(cells.values()))
  return (['## 3. Surgical fine-tuning (Lee et al. 2023)', '',
           f'MNIST (all ten digits) to optdigits at '
           f'{common.size_label(rows[0]["per_class"], first["num_train"])}: the same labels, '
           'other writers, 8x8 scans. Every stage and the head start from the MNIST network; '
           'only the arm\'s stages train. Test top-1 (%, mean [95 % CI] over '
           f'{first["interval"].n} seeds); differences are paired over seeds.', '',
           surgical.table(cells), ''] + [f'- {s}' for s in sentences] + [''] +
          [f'- {c["sentence"]}' for c in claims] +
          ['', '![accuracy per tuned block](figures/surgical.png)', ''])


def _scratch(out: str, figures: str) -> list[str]:
  base = os.path.join(out, svp.NAME)
  rows = common.read_jsonl(os.path.join(base, 'runs.jsonl'))
  svp.plot(common.read_jsonl(os.path.join(base, 'curves.jsonl')),
           os.path.join(figures, 'scratch_vs_pretrained.png'))
  gaps = svp.gaps(rows)
  seeds = max(g['gap'].n for g in gaps) if gaps else 0
  lines = (['## 4. Pretraining vs training from scratch', '',
            f'Test top-1 (%, mean [95 % CI] over {seeds} seeds) of the target trained from '
            'scratch, fine-tuned from the network pretrained on MNIST 0-4 and, where it ran, '
            'from one pretrained on FractalDB; the gaps are paired over seeds.',
            '', svp.table(gaps), ''] + [f'- {s}' for s in svp.findings(gaps)] +
           ['', '![accuracy against epochs](figures/scratch_vs_pretrained.png)', ''])
  config = os.path.join(out, 'config.json')
  if any(r['init'] == 'fractaldb' for r in rows) and os.path.exists(config):
    name = common.read_json(config)['fractaldb']['data']['name']
    c = fractaldb.builder_config(name)
    images, labels = fractaldb.generate(c.classes, c.instances, c.image_size, c.seed)
    fractaldb.save_grid(images, labels, os.path.join(figures, 'fractaldb_grid.png'))
    lines += [f'The FractalDB source (`{name}`: {c.classes} classes of iterated function '
              f'systems, {c.instances} instances each), the first instances of every class:',
              '', '![FractalDB samples](figures/fractaldb_grid.png)', '']
  return lines


def _features(out: str, figures: str) -> list[str]:
  base = os.path.join(out, features_l2.NAME)
  results = common.read_json(os.path.join(base, 'results.json'))
  grid = os.path.join(base, 'knn_grid.png')
  lines = ['## 5. Features in L2 space', '', features_l2.table(results), ''] + [
      f'- {s}' for s in features_l2.findings(results)] + ['']
  if os.path.exists(grid):
    _copy(grid, os.path.join(figures, 'knn_grid.png'))
    lines += ['![nearest neighbours](figures/knn_grid.png)', '']
  return lines


def _arch(out: str, figures: str) -> list[str]:
  del figures
  rows = common.read_jsonl(os.path.join(out, arch_compare.NAME, 'rows.jsonl'))
  return ['## 6. Architecture comparison', '',
          'Every family trained from scratch on MNIST (10 classes, 200 training images each) '
          'with the same schedule; reduced widths and small inputs so that every family trains '
          'within the CPU budget. Images/s are medians over rounds in which every model\'s '
          'train and eval steps take turns, on this machine, while `run_all` runs other tasks '
          'in another process.', '',
          arch_compare.table(rows), '', arch_compare.resnext_finding(rows), '']


def _copy(src: str, dst: str):
  with open(src, 'rb') as f, open(dst, 'wb') as g:
    g.write(f.read())


SECTIONS = ((freeze_sweep.NAME, 'runs.jsonl', _freeze),
            (transfer_arms.NAME, 'runs.jsonl', _transfer),
            (surgical.NAME, 'runs.jsonl', _surgical), (svp.NAME, 'runs.jsonl', _scratch),
            (features_l2.NAME, 'results.json', _features),
            (arch_compare.NAME, 'rows.jsonl', _arch))


def render(out: str) -> str:
  """Writes OUT/report.md (and OUT/figures/*.png); returns the path of report.md."""
  figures = os.path.join(out, 'figures')
  os.makedirs(figures, exist_ok=True)
  lines = ['# cnn_arch experiments', '']
  config = os.path.join(out, 'config.json')
  if os.path.exists(config):
    cfg = common.read_json(config)
    lines += [f'Produced by `python -m experiments.run_all`, preset `{cfg["preset"]}` of the '
              f'`{cfg["name"]}` experiment config.', '']
    tune = cfg['tune']
    if tune['experiments'] and tuple(tune['factors']) != (1.0,):
      lines += [f'Every arm (a cell of a table) of {", ".join(tune["experiments"])} runs at '
                'the learning rate it selects on validation: its first '
                f'{"seed" if tune["seeds"] == 1 else str(tune["seeds"]) + " seeds"} at '
                f'{", ".join(f"{f:g}" for f in tune["factors"])} '
                'times the configured rate, the other seeds at the best; the tables name the '
                'rate ("lr"), and `lr_grid.jsonl` beside `runs.jsonl` holds every validation '
                'score of the grid. The other experiments\' arms run at the configured rate.',
                '']
  for name, marker, section in SECTIONS:
    if os.path.exists(os.path.join(out, name, marker)):
      lines += section(out, figures)
  path = os.path.join(out, 'report.md')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))
  return path


if __name__ == '__main__':
  common.main(lambda cfg, out: print(render(out)))
