"""Yosinski et al.'s transfer arms: which stages transfer, and what copying them costs.

    python -m experiments.transfer_arms --config=configs/experiments/digits.py --out=results/

Yosinski, Clune, Bengio & Lipson (2014, "How transferable are features in deep neural
networks?", NeurIPS) split the classes into A (source) and B (target) and copy the first k
layers of a network into a new one, whose layers above k start fresh:

  * base B: trained on B from scratch (here one per seed, on that seed's target subset);
  * BnB (selffer): the first k stages of base B, frozen, the rest re-initialised and trained
    on B again. A drop below base B means that co-adapted neighbouring stages were split;
  * AnB (transfer): the first k stages of the network trained on A, frozen, the rest fresh.
    AnB below BnB means that stage k's features are specific to A;
  * AnB+: as AnB, but nothing frozen: copying k stages then fine-tuning everything. Above
    base B means that the copied features still help after fine-tuning.

Each seed draws the target subset, head initialisation and data order that all its arms share,
so every difference is paired. k runs over `cfg.transfer.depths` (1..4 of the five stages before
the head by default). Each (arm, k) runs at the learning rate it selects on validation
(`common.run_tuned`) when `tune.experiments` names this experiment (the full preset), else
at the configured rate, as Yosinski et al. train every arm alike. Writes OUT/transfer_arms/runs.jsonl (one line per run: `arm`, `depth`,
`seed`, `lr`, validation `val_top1`, test `top1`) and lr_grid.jsonl; `summarize`, `table`,
`findings` and `plot` make the report's table, claims and figure.
"""

import os

from experiments import common, stats

NAME = 'transfer_arms'
ARMS = ('BnB', 'AnB', 'AnB+')  # base B is depth-independent and fills the table's first column
COLOURS = {'base B': 'k', 'BnB': 'tab:blue', 'AnB': 'tab:red', 'AnB+': 'tab:orange'}


def arm_config(cfg, arm: str, depth: int, seed: int, source: str = '', base_b: str = ''):
  """The trainer config of one arm: `source` is the network trained on A, `base_b` this seed's
  base B checkpoint; base B itself (depth 0) starts from nothing."""
  t = cfg.transfer
  init_from = {'base B': '', 'BnB': base_b, 'AnB': source, 'AnB+': source}[arm]
  frozen = depth if arm in ('BnB', 'AnB') else 0
  config = common.target_config(cfg, per_class=t.per_class, seed=seed, steps=t.steps,
                                depth=frozen, init_from=init_from)
  if init_from:
    config.finetune.copy_depth = depth
  return config


def run(cfg, out: str) -> list[dict]:
  """Trains base B per seed (with a checkpoint: BnB copies it), then every arm at every depth,
  each cell at its learning rate (`common.run_tuned`, `common.tuning`)."""
  tune = common.tuning(cfg, NAME)
  source = common.pretrained(cfg, out)
  t = cfg.transfer
  base_jobs = [('base B', f's{seed}', arm_config(cfg, 'base B', 0, seed),
                dict(arm='base B', depth=0, seed=seed)) for seed in t.seeds]
  done, grid = common.run_tuned(base_jobs, tune, os.path.join(out, NAME, 'base'),
                                f'{NAME} (base B)', keep_final=True)
  base = {f['seed']: workdir for f, _, workdir in done}
  jobs = [((arm, depth), f'{arm}_d{depth}_s{seed}',
           arm_config(cfg, arm, depth, seed, source, base[seed]),
           dict(arm=arm, depth=depth, seed=seed))
          for depth in t.depths for arm in ARMS for seed in t.seeds]
  arms, arms_grid = common.run_tuned(jobs, tune, os.path.join(out, NAME, 'runs'), NAME)
  rows = [dict(f, per_class=t.per_class, num_train=r['num_train'], val_top1=r['top1'],
               top1=r['test_top1']) for f, r, _ in done + arms]
  common.write_jsonl(os.path.join(out, NAME, 'runs.jsonl'), rows)
  common.write_jsonl(os.path.join(out, NAME, 'lr_grid.jsonl'), grid + arms_grid)
  return rows


def summarize(rows: list[dict]) -> dict:
  """{(arm, depth): {'by_seed': {seed: test top-1}, 'interval': stats.Interval, 'num_train',
  'lr' (the cell's learning rate)}}; base B is under depth 0."""
  cells = {}
  for r in rows:
    cell = cells.setdefault((r['arm'], r['depth']), {'by_seed': {}, 'num_train': r['num_train'],
                                                     'lr': r.get('lr')})
    cell['by_seed'][r['seed']] = r['top1']
  for cell in cells.values():
    cell['interval'] = stats.mean_interval(cell['by_seed'].values())
  return dict(sorted(cells.items()))


def _depths(cells) -> list[int]:
  return sorted({d for arm, d in cells if arm != 'base B'})


def table(cells: dict) -> str:
  """Markdown: rows = copied depth k, columns = arms; test top-1 (%) mean [95 % CI] and the
  learning rate chosen on validation."""
  text = lambda c: c['interval'].format(1, 100) + common.lr_label(c['lr'])
  base = text(cells[('base B', 0)])
  lines = ['| copied stages k | base B | ' + ' | '.join(ARMS) + ' |',
           '|---' * (len(ARMS) + 2) + '|']
  for d in _depths(cells):
    row = [text(cells[(a, d)]) if (a, d) in cells else '–' for a in ARMS]
    lines.append(f'| {d} | {base} | ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def _diff(cells, a, b):
  return stats.paired_difference(cells[a]['by_seed'], cells[b]['by_seed'],
                                 labels=(f'{a[0]} k={a[1]}', f'{b[0]} k={b[1]}'))


def _mean_over(cells, arm, depths) -> dict:
  """Per seed, the mean top-1 of `arm` over `depths` (one paired value per seed)."""
  by_seed = [cells[(arm, d)]['by_seed'] for d in depths]
  return {s: sum(b[s] for b in by_seed) / len(by_seed) for s in by_seed[0]}


def findings(cells: dict) -> tuple[list[str], list[dict]]:
  """Per depth, each arm against base B in words; then Yosinski et al.'s three findings as claims.

  Co-adaptation: BnB below base B, averaged over the interior depths (neither the first nor the
  last of `depths`; all of them when there are fewer than three). Specificity: AnB below BnB at
  the deepest k. Transfer helps generalisation: AnB+ above base B, averaged over every depth.
  """
  depths = _depths(cells)
  base = ('base B', 0)
  sentences = [f'k = {d}: ' + '; '.join(
      stats.sentence(arm, 'base B', _diff(cells, (arm, d), base))
      for arm in ARMS if (arm, d) in cells) + '.' for d in depths]
  interior = depths[1:-1] or depths
  span = f'k = {interior[0]}..{interior[-1]}' if len(interior) > 1 else f'k = {interior[0]}'
  base_by_seed = cells[base]['by_seed']
  claims = [
      stats.claim('Yosinski et al. (co-adaptation)', stats.LESS,
                  stats.paired_difference(_mean_over(cells, 'BnB', interior), base_by_seed),
                  f'BnB is below base B at the middle depths ({span}, averaged)'),
      stats.claim('Yosinski et al. (specificity)', stats.LESS,
                  _diff(cells, ('AnB', depths[-1]), ('BnB', depths[-1])),
                  f'AnB is below BnB at the deepest copied stage (k = {depths[-1]})'),
      stats.claim('Yosinski et al. (generalisation)', stats.GREATER,
                  stats.paired_difference(_mean_over(cells, 'AnB+', depths), base_by_seed),
                  f'AnB+ is above base B (k = {depths[0]}..{depths[-1]}, averaged)'),
  ]
  return sentences, claims


def plot(cells: dict, path: str):
  """Test top-1 against copied depth k per arm (mean, band = 95 % CI), base B as a line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  depths = _depths(cells)
  fig, ax = plt.subplots(figsize=(6, 4))
  base = cells[('base B', 0)]['interval']
  ax.axhline(100 * base.mean, color=COLOURS['base B'], lw=1, label='base B')
  ax.axhspan(100 * max(base.low, 0.0), 100 * min(base.high, 1.0), color=COLOURS['base B'],
             alpha=0.08)
  for arm in ARMS:
    ks = [d for d in depths if (arm, d) in cells]
    iv = [cells[(arm, d)]['interval'] for d in ks]
    ax.plot(ks, [100 * i.mean for i in iv], marker='o', color=COLOURS[arm], label=arm)
    ax.fill_between(ks, [100 * max(i.low, 0.0) for i in iv], [100 * min(i.high, 1.0) for i in iv],
                    color=COLOURS[arm], alpha=0.15)
  ax.set_xticks(depths)
  ax.set_xlabel('stages copied k (AnB, BnB: frozen; AnB+: fine-tuned)')
  ax.set_ylabel('target test top-1 (%)')
  ax.set_title('Transfer arms (Yosinski et al. 2014)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  common.main(lambda cfg, out: print(table(summarize(run(cfg, out)))))
