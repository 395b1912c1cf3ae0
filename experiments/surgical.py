"""Surgical fine-tuning: which one block to tune under an input-level shift.

    python -m experiments.surgical --config=configs/experiments/digits.py --out=results/

Lee, Chen, Tajwar, Kumar, Yao, Liang & Finn (ICLR 2023, "Surgical Fine-Tuning Improves
Adaptation to Distribution Shifts") fine-tune a single block of a pretrained network and freeze
the rest. When the target differs from the source in its inputs only (same labels: corrupted or
re-rendered images), tuning the first block does best, better than any later block and than
tuning everything. Here the source is a network trained on all ten MNIST digits and the target
is UCI optdigits, the same ten digits scanned from other writers at 8x8 (upsampled to the
network's input): the labels keep their meaning, so the source head is kept, and only the
input distribution moves. Arms (`cfg.surgical.arms`): 'block 1' (stem and stage1, the paper's
first block of a ResNet), 'stage2'..'stage4', 'head' (a linear probe on the kept head), 'all'
(full fine-tuning). Each seed draws the target subset and data order its arms share, so
differences are paired; each arm runs at the learning rate it selects on validation
(`common.run_tuned`, as Lee et al. tune each arm's). Writes OUT/surgical/runs.jsonl (`arm`,
`seed`, `lr`, validation `val_top1`, test `top1`) and lr_grid.jsonl; `summarize`, `table`,
`findings` and `plot` make the report's section.
"""

import os

from experiments import common, stats

NAME = 'surgical'
FIRST, HEAD, ALL = 'block 1', 'head', 'all'
ARMS = {FIRST: ('stem', 'stage1'), 'stage2': ('stage2',), 'stage3': ('stage3',),
        'stage4': ('stage4',), HEAD: (), ALL: None}  # arm -> stages trained (None: every one)


def arm_config(cfg, arm: str, seed: int, source: str):
  """The trainer config of one arm: every stage and the head copied from `source`; the arm's
  stages train (with the head only in 'head' and 'all')."""
  if arm not in ARMS:
    raise ValueError(f'surgical.arms has {arm!r}; choose from {list(ARMS)}.')
  sg = cfg.surgical
  config = common.target_config(cfg, per_class=sg.per_class, seed=seed, steps=sg.steps,
                                init_from=source, target=sg.target)
  config.finetune.copy_depth = None  # the source head too: the labels are the same ten digits
  config.finetune.train_stages = ARMS[arm]
  config.finetune.train_head = arm in (HEAD, ALL)
  return config


def run(cfg, out: str) -> list[dict]:
  """Pretrains the ten-digit source once, then runs every arm for every seed at the learning
  rate the arm selects on validation (`common.run_tuned`)."""
  tune = common.tuning(cfg, NAME)
  source = os.path.join(out, NAME, 'source')
  common.pretrain(cfg.surgical.source, source)
  sg = cfg.surgical
  jobs = [(arm, f'{arm.replace(" ", "")}_s{seed}', arm_config(cfg, arm, seed, source),
           dict(arm=arm, seed=seed)) for arm in sg.arms for seed in sg.seeds]
  done, grid = common.run_tuned(jobs, tune, os.path.join(out, NAME, 'runs'), NAME)
  rows = [dict(f, per_class=sg.per_class, num_train=r['num_train'], val_top1=r['top1'],
               top1=r['test_top1']) for f, r, _ in done]
  common.write_jsonl(os.path.join(out, NAME, 'runs.jsonl'), rows)
  common.write_jsonl(os.path.join(out, NAME, 'lr_grid.jsonl'), grid)
  return rows


def summarize(rows: list[dict]) -> dict:
  """{arm: {'by_seed', 'val_by_seed', 'interval', 'num_train', 'lr'}}, in `ARMS` order."""
  cells = {}
  for r in rows:
    cell = cells.setdefault(r['arm'], {'by_seed': {}, 'val_by_seed': {},
                                       'num_train': r['num_train'], 'lr': r.get('lr')})
    cell['by_seed'][r['seed']] = r['top1']
    cell['val_by_seed'][r['seed']] = r['val_top1']
  for cell in cells.values():
    cell['interval'] = stats.mean_interval(cell['by_seed'].values())
    cell['val_mean'] = sum(cell['val_by_seed'].values()) / len(cell['val_by_seed'])
  return {arm: cells[arm] for arm in ARMS if arm in cells}


def table(cells: dict) -> str:
  """Markdown: one row per arm, the stages it trains, test top-1 (%) mean [95 % CI], and the
  validation mean that picks the best later block, and the learning rate chosen on validation."""
  lines = ['| arm | trains | test top-1 (%) | validation top-1 (%) | lr |', '|---|---|---|---|---|']
  for arm, cell in cells.items():
    trains = 'every stage and the head' if ARMS[arm] is None else (
        ', '.join(ARMS[arm] + ((HEAD,) if arm == HEAD else ())))
    lines.append(f'| {arm} | {trains} | {cell["interval"].format(1, 100)} | '
                 f'{100 * cell["val_mean"]:.1f} | {cell["lr"] if cell["lr"] is not None else "–"} |')
  return '\n'.join(lines)


def _diff(cells, a: str, b: str):
  return stats.paired_difference(cells[a]['by_seed'], cells[b]['by_seed'], labels=(a, b))


def findings(cells: dict) -> tuple[list[str], list[dict]]:
  """Every arm against 'block 1' in words; then Lee et al.'s two claims.

  First block beats the other single blocks: 'block 1' above the later single-block arm of
  highest mean validation top-1 (chosen on validation, compared on test). First block beats
  full fine-tuning: 'block 1' above 'all'.
  """
  if FIRST not in cells:
    return [], []
  sentences = [stats.sentence(FIRST, arm, _diff(cells, FIRST, arm))
               for arm in cells if arm != FIRST]
  claims = []
  others = [arm for arm in cells if arm not in (FIRST, ALL)]
  if others:
    best = max(others, key=lambda a: (cells[a]['val_mean'], a))
    claims.append(stats.claim('Lee et al. (which block)', stats.GREATER,
                              _diff(cells, FIRST, best),
                              f'tuning the first block beats tuning any later one (best by '
                              f'validation: {best})'))
  if ALL in cells:
    claims.append(stats.claim('Lee et al. (against full fine-tuning)', stats.GREATER,
                              _diff(cells, FIRST, ALL),
                              'tuning the first block beats tuning everything'))
  return sentences, claims


def plot(cells: dict, path: str):
  """Test top-1 per arm: mean over seeds with its 95 % CI, one dot per seed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  arms = list(cells)
  fig, ax = plt.subplots(figsize=(6, 3.6))
  for i, arm in enumerate(arms):
    iv = cells[arm]['interval']
    colour = 'tab:red' if arm == FIRST else 'tab:blue'
    ax.errorbar([i], [100 * iv.mean], yerr=[[100 * (iv.mean - max(iv.low, 0.0))],
                                            [100 * (min(iv.high, 1.0) - iv.mean)]],
                fmt='o', color=colour, capsize=4, ms=7)
    ax.scatter([i + 0.15] * len(cells[arm]['by_seed']),
               [100 * v for v in cells[arm]['by_seed'].values()], color=colour, s=10, alpha=0.5)
  ax.set_xticks(range(len(arms)), arms)
  ax.set_xlabel('stages fine-tuned (the rest frozen)')
  ax.set_ylabel('optdigits test top-1 (%)')
  ax.set_title('Surgical fine-tuning, MNIST -> optdigits (Lee et al. 2023)')
  ax.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  common.main(lambda cfg, out: print(table(summarize(run(cfg, out)))))
