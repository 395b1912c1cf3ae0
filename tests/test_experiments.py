"""Tests of experiments/: k-NN against brute force, the summaries, the report, and a tiny
end-to-end run of all four experiments (real code path, shared compiled programs)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.special
import scipy.stats
from ml_collections import ConfigDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cnn_arch import finetune  # pylint: disable=g-import-not-at-top
from cnn_arch.train_setup import make_setup  # pylint: disable=g-import-not-at-top
from configs.experiments import digits  # pylint: disable=g-import-not-at-top
from experiments import arch_compare, common, features_l2, freeze_sweep, report, run_all, surgical
from experiments import scratch_vs_pretrained as svp
from experiments import transfer_arms

PNG = b'\x89PNG\r\n\x1a\n'


def _brute_nearest(queries, keys, k):
  out_idx, out_dist = [], []
  for q in queries:
    d = [math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(q, key))) for key in keys]
    order = sorted(range(len(keys)), key=lambda i: (d[i], i))[:k]
    out_idx.append(order)
    out_dist.append([d[i] for i in order])
  return np.array(out_idx), np.array(out_dist)


def test_nearest_matches_brute_force():
  rng = np.random.default_rng(0)
  keys, queries = rng.normal(size=(40, 7)), rng.normal(size=(9, 7))
  idx, dist = features_l2.nearest(queries, keys, 5)
  ref_idx, ref_dist = _brute_nearest(queries, keys, 5)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(dist, ref_dist, rtol=1e-9, atol=1e-9)


def test_nearest_breaks_exact_ties_by_index_and_finds_itself():
  keys = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]])
  idx, dist = features_l2.nearest(keys[:1], keys, 3)
  assert idx.tolist() == [[0, 1, 2]]  # 1 and 2 are both at distance 1
  assert dist.tolist() == [[0.0, 1.0, 1.0]]
  with pytest.raises(ValueError, match='k=5 must be between 1 and the number of keys'):
    features_l2.nearest(keys, keys, 5)


def _brute_vote(row_labels):
  counts = {}
  for label in row_labels:
    counts[label] = counts.get(label, 0) + 1
  best = max(counts.values())
  return next(label for label in row_labels if counts[label] == best)  # nearest among tied


def test_knn_predict_matches_reference_vote():
  rng = np.random.default_rng(1)
  key_labels = rng.integers(0, 4, size=30)
  neighbours = np.stack([rng.permutation(30)[:5] for _ in range(200)])
  expected = [_brute_vote(key_labels[row].tolist()) for row in neighbours]
  np.testing.assert_array_equal(features_l2.knn_predict(neighbours, key_labels, 4), expected)
  # Two classes with two votes each: the one whose nearest vote is closer wins.
  assert features_l2.knn_predict(np.array([[0, 1, 2, 3]]), np.array([2, 1, 1, 2]), 3) == [2]


def test_linear_probe_converges_to_the_regularised_optimum():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 3, size=90)
  x = np.eye(3)[y] * 4 + rng.normal(scale=0.3, size=(90, 3))
  top1, grad = features_l2.linear_probe(x, y, x, y, 3, l2=1e-3)
  assert top1 == 1.0 and grad < 1e-5
  # Overlapping classes: the optimum of the same objective found by plain gradient descent.
  x = rng.normal(size=(90, 3)) + 0.5 * np.eye(3)[y]
  top1, grad = features_l2.linear_probe(x, y, x, y, 3, l2=0.1)
  xs = np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-6), np.ones((90, 1))], 1)
  w = np.zeros((4, 3))
  for _ in range(5000):
    p = scipy.special.softmax(xs @ w, axis=1)
    g = xs.T @ (p - np.eye(3)[y]) / 90
    g[:-1] += 0.1 * w[:-1]
    w -= 0.5 * g
  assert grad < 1e-5 and top1 == np.mean(np.argmax(xs @ w, 1) == y)


def test_features_table_and_findings_pair_seeds():
  rows = [dict(network=n, seed=s, knn_top1=k + 0.01 * s, probe_top1=p + 0.02 * (s % 2), dims=8,
               k=5, num_train=500, num_test=100, probe_grad_norm=0.0)
          for n, k, p in (('pretrained', 0.9, 0.95), ('random', 0.8, 0.95), ('pixels', 0.85, 0.9))
          for s in range(3)]
  results = {'rows': rows}
  lines = features_l2.table(results).splitlines()
  assert lines[2].startswith('| pretrained | 8 | 91.0 [88.5, 93.5] |') and lines[2].endswith('| 3 |')
  found = features_l2.findings(results)
  assert found[0].startswith('5-NN on pretrained features is 10.0 top-1 points above 5-NN on random')
  assert found[1].startswith('The data cannot tell linear probe on pretrained features from '
                             'linear probe on random')


def _rows(per_class, depth, tops, vals=None):
  vals = tops if vals is None else vals
  return [dict(per_class=per_class, depth=depth, seed=s, frozen='stem' if depth else '-',
               num_train=5 * per_class, top1=t, val_top1=v, seconds=1.0)
          for s, (t, v) in enumerate(zip(tops, vals))]


def test_freeze_summary_table_and_best_depth():
  rows = (_rows(5, 0, [0.5, 0.7], vals=[0.9, 0.9]) + _rows(5, 1, [0.8, 0.8], vals=[0.5, 0.5]) +
          _rows(50, 0, [0.9, 0.95]) + _rows(50, 1, [0.85, 0.85]))
  summary = freeze_sweep.summarize(rows)
  assert [(r['per_class'], r['depth']) for r in summary] == [(5, 0), (5, 1), (50, 0), (50, 1)]
  assert summary[0]['mean'] == pytest.approx(0.6)
  half = scipy.stats.t.ppf(0.975, 1) * np.std([0.5, 0.7], ddof=1) / math.sqrt(2)
  assert summary[0]['interval'].high - 0.6 == pytest.approx(half)
  # Validation selects: depth 0 at 5/class although its test mean is lower.
  assert freeze_sweep.best_depths(summary) == {5: 0, 50: 0}
  assert freeze_sweep.best_depths(summary, frozen_only=True) == {5: 1, 50: 1}
  lines = freeze_sweep.table(summary).splitlines()
  assert len(lines) == 2 + 2 + 1  # header, rule, two depths, best-depth row
  assert lines[2].startswith(f'| 0 (-) | **60.0 [{60 - 100 * half:.1f}, {60 + 100 * half:.1f}]**')
  assert lines[3].startswith('| 1 (stem) | 80.0 [80.0, 80.0] |')
  assert lines[-1] == '| best depth (validation) | 0 | 0 |'


def test_freeze_findings_pair_seeds_and_state_the_rule():
  # 5 seeds; at 5/class depth 1 is +10 points on every seed, at 50/class depth 0 is +5.
  small = _rows(5, 0, [0.5, 0.6, 0.55, 0.52, 0.58]) + _rows(5, 1, [0.6, 0.7, 0.65, 0.62, 0.68])
  large = (_rows(50, 0, [0.9, 0.91, 0.92, 0.93, 0.94]) +
           _rows(50, 1, [0.85, 0.86, 0.87, 0.88, 0.89]))
  sentences, rule = freeze_sweep.findings(freeze_sweep.summarize(small + large))
  assert sentences[0].startswith('5/class (25): depth 1 is 10.0 top-1 points above depth 0')
  assert 'Selected depth against full fine-tuning: depth 1 is 10.0' in sentences[0]
  assert 'depth 1 is 5.0 top-1 points below depth 0' in sentences[1]
  assert rule['status'] == 'holds'
  # Noise at the large size: the rule can no longer be confirmed.
  noisy = _rows(50, 0, [0.9, 0.8, 0.92, 0.83, 0.94]) + _rows(50, 1, [0.85, 0.86, 0.87, 0.88, 0.89])
  sentences, rule = freeze_sweep.findings(freeze_sweep.summarize(small + noisy))
  assert rule['status'] == 'cannot tell here' and 'cannot tell depth 1 from depth 0' in sentences[1]
  # Full fine-tuning better at the small size: does not hold.
  flipped = _rows(5, 0, [0.7, 0.8, 0.75, 0.72, 0.78]) + _rows(5, 1, [0.6, 0.7, 0.65, 0.62, 0.68])
  assert freeze_sweep.findings(freeze_sweep.summarize(flipped + large))[1]['status'] == (
      'does not hold')


def _svp_rows(gaps_by_schedule, noise=0.0, fractal=None):
  """Scratch at 0.5 (+ per-seed noise), pretrained at scratch + gap on each of 5 seeds;
  `fractal`: FractalDB-pretrained at scratch + fractal too."""
  rows = []
  for schedule, gap in gaps_by_schedule:
    for seed in range(5):
      base = 0.5 + noise * (seed - 2)
      inits = [('scratch', base), ('pretrained', base + gap + noise * (seed % 2))]
      if fractal is not None:
        inits.append(('fractaldb', base + fractal + noise * (2 - seed)))
      for init, top1 in inits:
        rows.append(dict(norm='batch', per_class=20, schedule=schedule, init=init, seed=seed,
                         num_train=100, epochs=float(schedule), top1=top1, val_top1=top1))
  return rows


def test_findings_are_computed_from_the_gaps():
  (text,) = svp.findings(svp.gaps(_svp_rows([(1, 0.2), (2, 0.1), (4, 0.05)])))
  assert 'MNIST-pretrained at 1x is 20.0 top-1 points above scratch at 1x' in text
  assert 'He et al. (small target), "pretraining still helps at the longest schedule (4x)": holds' in text
  assert '"the gap at 1x is larger than at 4x": holds' in text
  assert 'Kataoka' not in text  # no FractalDB runs
  (level,) = svp.findings(svp.gaps(_svp_rows([(1, 0.1), (4, 0.0)], noise=0.02)))
  assert 'the data cannot tell MNIST-pretrained at 4x from scratch at 4x' in level
  assert '"pretraining still helps at the longest schedule (4x)": cannot tell here' in level
  # FractalDB 5 points above scratch, 5 below MNIST at 1x (noise 0.02 on every seed).
  (fractal,) = svp.findings(svp.gaps(_svp_rows([(1, 0.1), (4, 0.0)], noise=0.02, fractal=0.05)))
  assert 'FractalDB-pretrained at 1x is 5.0 top-1 points above scratch at 1x' in fractal
  assert ('Kataoka et al. (against scratch), "FractalDB pretraining beats training from scratch '
          '(1x)": holds') in fractal
  assert '"pretraining on MNIST 0-4 beats pretraining on FractalDB (1x)": holds' in fractal
  header, _, row = svp.table(svp.gaps(_svp_rows([(1, 0.1)], fractal=0.05))).splitlines()
  assert header.endswith('| FractalDB top-1 (%) | gap, MNIST 0-4 - scratch (points) | '
                         'gap, FractalDB - scratch (points) |')
  assert row.endswith('| 55.0 [55.0, 55.0] | 10.0 [10.0, 10.0] | 5.0 [5.0, 5.0] |')


def test_gaps_pair_inits_and_average_seeds():
  rows = [dict(norm='group', per_class=0, schedule=2, init=i, seed=s, num_train=600, epochs=3.0,
               top1=t) for i, s, t in (('scratch', 0, 0.6), ('scratch', 1, 0.8),
                                       ('pretrained', 0, 0.9), ('pretrained', 1, 0.9))]
  (g,) = svp.gaps(rows)
  assert g['scratch'].mean == pytest.approx(0.7) and g['gap'].mean == pytest.approx(0.2)
  assert g['by_seed'] == pytest.approx({0: 0.3, 1: 0.1})
  half = 100 * scipy.stats.t.ppf(0.975, 1) * np.std([0.3, 0.1], ddof=1) / math.sqrt(2)
  assert (f'| group | all (600) | 2x | 3.0 | {g["scratch"].format(1, 100)} | 90.0 [90.0, 90.0] | '
          f'20.0 [{20 - half:.1f}, {20 + half:.1f}] |') in svp.table([g])
  assert 'fractal_gap' not in g and g['lr'] == {'scratch': None, 'pretrained': None}


def test_transfer_arms_copy_freeze_and_reinitialise_the_right_stages():
  cfg = digits.get_config()
  names = common.stage_names(cfg.target)  # stem, stage1..stage4, head
  expected = {  # arm: (init_from, frozen stages, re-initialised stages) at k = 2
      'base B': ('', (), ()),
      'BnB': ('B', names[:2], names[2:]),
      'AnB': ('A', names[:2], names[2:]),
      'AnB+': ('A', (), names[2:]),
  }
  for arm, (init_from, frozen, reinit) in expected.items():
    config = transfer_arms.arm_config(cfg, arm, 2, seed=3, source='A', base_b='B')
    assert config.finetune.init_from == init_from and config.seed == 3
    assert config.data.per_class == cfg.transfer.per_class and config.data.subset_seed == 3
    plan = finetune.make_plan(config, names, None, steps_per_epoch=4, total_steps=4)
    assert plan.phases[0].frozen == frozen and plan.reinit == reinit, arm


def _transfer_rows(base, arms, noise=0.0):
  """5 seeds; `arms` maps (arm, depth) -> mean top-1; seed s adds noise * (s - 2) to an arm."""
  rows = [dict(arm='base B', depth=0, seed=s, per_class=100, num_train=500, val_top1=base,
               top1=base) for s in range(5)]
  for (arm, depth), top1 in arms.items():
    rows += [dict(arm=arm, depth=depth, seed=s, per_class=100, num_train=500,
                  val_top1=top1, top1=top1 + noise * (s - 2)) for s in range(5)]
  return rows


def test_transfer_findings_state_yosinskis_claims():
  arms = {('BnB', 1): 0.9, ('BnB', 2): 0.85, ('BnB', 3): 0.86, ('BnB', 4): 0.9,
          ('AnB', 1): 0.9, ('AnB', 2): 0.88, ('AnB', 3): 0.84, ('AnB', 4): 0.8,
          ('AnB+', 1): 0.92, ('AnB+', 2): 0.93, ('AnB+', 3): 0.92, ('AnB+', 4): 0.91}
  cells = transfer_arms.summarize(_transfer_rows(0.9, arms))
  sentences, claims = transfer_arms.findings(cells)
  assert sentences[1].startswith('k = 2: BnB is 5.0 top-1 points below base B')
  assert [c['status'] for c in claims] == ['holds'] * 3
  assert 'middle depths (k = 2..3, averaged)' in claims[0]['sentence']
  assert claims[1]['mean'] == pytest.approx(-0.1)  # AnB - BnB at k = 4
  assert claims[2]['mean'] == pytest.approx(0.02)
  lines = transfer_arms.table(cells).splitlines()
  assert lines[0] == '| copied stages k | base B | BnB | AnB | AnB+ |'
  assert lines[3] == ('| 2 | 90.0 [90.0, 90.0] | 85.0 [85.0, 85.0] | 88.0 [88.0, 88.0] | '
                      '93.0 [93.0, 93.0] |')
  # Seed noise shared by the arms but not by base B swamps the gains over base B; AnB - BnB
  # stays exact.
  noisy = transfer_arms.findings(transfer_arms.summarize(_transfer_rows(0.9, arms, 0.05)))[1]
  assert [c['status'] for c in noisy] == ['cannot tell here', 'holds', 'cannot tell here']


def test_surgical_arms_train_one_block_and_keep_every_copied_stage():
  cfg = digits.get_config()
  names = common.stage_names(cfg.surgical.target)  # stem, stage1..stage4, head
  trained = {'block 1': ('stem', 'stage1'), 'stage2': ('stage2',), 'stage3': ('stage3',),
             'stage4': ('stage4',), 'head': ('head',), 'all': names}
  assert tuple(cfg.surgical.arms) == tuple(trained)
  for arm, stages in trained.items():
    config = surgical.arm_config(cfg, arm, seed=2, source='SRC')
    assert config.data.name == 'optdigits' and config.data.per_class == cfg.surgical.per_class
    assert config.finetune.init_from == 'SRC' and config.data.subset_seed == 2
    plan = finetune.make_plan(config, names, None, steps_per_epoch=4, total_steps=4)
    assert plan.phases[0].frozen == tuple(n for n in names if n not in stages), arm
    assert plan.reinit == (), arm  # the source head too: same ten labels
  assert names == ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')
  with pytest.raises(ValueError, match=r"surgical.arms has 'stage9'; choose from \['block 1'"):
    surgical.arm_config(cfg, 'stage9', seed=0, source='SRC')


def _surgical_rows(means, noise=0.0, val=None):
  """5 seeds per arm; seed s adds noise * (s - 2) to every arm but 'all'."""
  return [dict(arm=arm, seed=s, per_class=20, num_train=200, lr=0.05,
               val_top1=(val or means)[arm], top1=top1 + (0 if arm == 'all' else noise * (s - 2)))
          for arm, top1 in means.items() for s in range(5)]


def test_surgical_findings_state_lee_et_al_claims():
  means = {'block 1': 0.9, 'stage2': 0.85, 'stage3': 0.8, 'stage4': 0.7, 'head': 0.6,
           'all': 0.88}
  cells = surgical.summarize(_surgical_rows(means))
  sentences, claims = surgical.findings(cells)
  assert sentences[0].startswith('block 1 is 5.0 top-1 points above stage2')
  assert [c['status'] for c in claims] == ['holds', 'holds']
  assert 'best by validation: stage2' in claims[0]['sentence']
  assert claims[0]['mean'] == pytest.approx(0.05) and claims[1]['mean'] == pytest.approx(0.02)
  lines = surgical.table(cells).splitlines()
  assert lines[0] == '| arm | trains | test top-1 (%) | validation top-1 (%) | lr |'
  assert lines[2] == '| block 1 | stem, stage1 | 90.0 [90.0, 90.0] | 90.0 | 0.05 |'
  assert lines[6] == '| head | head | 60.0 [60.0, 60.0] | 60.0 | 0.05 |'
  # Validation, not test, picks the block to beat: stage4 by validation, test gap 20 points.
  val = dict(means, stage4=0.95)
  (which, _) = surgical.findings(surgical.summarize(_surgical_rows(means, val=val)))[1]
  assert 'best by validation: stage4' in which['sentence'] and which['mean'] == pytest.approx(0.2)
  # Seed noise that 'all' does not share swamps a 2-point gain: cannot tell.
  noisy = surgical.findings(surgical.summarize(_surgical_rows(means, noise=0.05)))[1]
  assert [c['status'] for c in noisy] == ['holds', 'cannot tell here']
  assert surgical.findings(surgical.summarize(_surgical_rows({'all': 0.9}))) == ([], [])


def test_presets_and_the_preset_flag():
  default, full = digits.get_config(), digits.get_config('full')
  assert (default.preset, full.preset) == ('default', 'full')
  assert tuple(default.freeze.per_class) == (5, 100) and len(default.freeze.seeds) == 5
  assert tuple(full.freeze.per_class) == (5, 20, 100, 1000) and len(full.freeze.seeds) == 10
  assert tuple(full.scratch.schedules) == (1, 2, 4, 8) and 1000 in full.scratch.per_class
  with pytest.raises(ValueError, match=r"Unknown experiments preset 'ful'; choose one of"):
    digits.get_config('ful')
  code = ('from experiments import common; common.main(lambda cfg, out: '
          'print(cfg.preset, cfg.transfer.steps, tuple(cfg.freeze.per_class)))')
  done = subprocess.run([sys.executable, '-c', code, '--out=unused', '--preset=full',
                         '--config.transfer.steps=7'], capture_output=True, text=True,
                        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True)
  assert done.stdout.splitlines()[-1] == 'full 7 (5, 20, 100, 1000)'


def test_programs_are_shared_by_runs_that_differ_only_in_init_seed_or_size():
  cfg = tiny_config()
  get = lambda c: common.programs(make_setup(c), c)
  base = common.target_config(cfg, per_class=5, seed=0, steps=2)
  pretrained = common.target_config(cfg, per_class=10, seed=1, steps=2, init_from='/nowhere')
  assert pretrained.finetune.copy_depth == 5  # a different initialisation, the same step
  assert get(pretrained) is get(base)
  assert get(common.target_config(cfg, per_class=5, seed=0, steps=2, depth=1)) is not get(base)
  assert get(common.target_config(cfg, per_class=5, seed=0, steps=3)) is not get(base)
  # A warm-up of one epoch: 1 of the 2 steps at 5/class, both at 10/class (2 steps an epoch).
  warm = [common.target_config(cfg, per_class=n, seed=0, steps=2) for n in (5, 10)]
  for c in warm:
    c.optim.warmup_epochs = 1.0
  assert [make_setup(c).total_steps for c in warm] == [2, 2]
  assert get(warm[0]) is not get(warm[1])


def test_run_tuned_selects_each_cells_rate_on_validation_of_its_first_seeds(monkeypatch):
  """Validation top-1 by (cell, lr): 'a' is best at 4x, 'b' ties 1x and 4x (the first factor
  wins), 'c' diverges at 4x and is best at 0.25x; only the first seed of a cell sees the grid."""
  val = {('a', 0.025): 0.5, ('a', 0.1): 0.6, ('a', 0.4): 0.7,
         ('b', 0.025): 0.5, ('b', 0.1): 0.8, ('b', 0.4): 0.8,
         ('c', 0.025): 0.9, ('c', 0.1): 0.2, ('c', 0.4): None}
  calls = []

  def fake_run(config, workdir, **kwargs):
    cell, seed = config.name.split('/')
    calls.append((cell, int(seed), config.optim.learning_rate, os.path.basename(workdir),
                  kwargs))
    top1 = val[cell, config.optim.learning_rate]
    if top1 is None:
      raise FloatingPointError('diverged')
    return {'top1': top1}

  monkeypatch.setattr(common, 'run', fake_run)
  jobs = []
  for cell in 'abc':
    for seed in (0, 1, 2):
      c = ConfigDict(dict(name=f'{cell}/{seed}', optim=dict(learning_rate=0.1)))
      jobs.append((cell, f'{cell}{seed}', c, dict(cell=cell, seed=seed), dict(eval_at=(1.0,))))
  tune = ConfigDict(dict(factors=(0.25, 1.0, 4.0), seeds=1))
  done, grid = common.run_tuned(jobs, tune, '/runs', 'test', keep_final=True)
  assert [(f['cell'], f['seed'], f['lr']) for f, _, _ in done] == [
      (c, s, lr) for c, lr in (('a', 0.4), ('b', 0.1), ('c', 0.025)) for s in (0, 1, 2)]
  assert [w for _, _, w in done][:2] == ['/runs/a0_lr0.4', '/runs/a1_lr0.4']
  assert [(g['cell'], g['lr'], g['val_top1']) for g in grid] == [
      (c, lr, val[c, lr]) for c in 'abc' for lr in (0.025, 0.1, 0.4)]
  assert {(c, s) for c, s, *_ in calls[:9]} == {('a', 0), ('b', 0), ('c', 0)}  # the grid
  assert all(k == {'keep_final': True, 'eval_at': (1.0,)} for *_, k in calls)
  assert len(calls) == 9 + 9  # every final run asked again (a finished one returns its results)
  for bad, match in ((dict(factors=()), r'tune.factors=\(\)'),
                     (dict(factors=(1.0, -2.0)), r'tune.factors=\(1.0, -2.0\): give one or more'),
                     (dict(seeds=0), r'tune.seeds=0: .* integer >= 1')):
    with pytest.raises(ValueError, match=match):
      common.run_tuned(jobs, ConfigDict({**tune.to_dict(), **bad}), '/runs', 'test')
  assert len(calls) == 18  # nothing ran


def test_frozen_prefix_is_evaluated_once_per_prefix_and_gives_the_plain_numbers(tmp_path):
  """Runs from one checkpoint (`keep_final`) with the same frozen prefix share its evaluation
  features; each run's numbers equal those of the plain path (cache_features=off), to float32
  rounding of the same sums."""
  cfg = tiny_config()
  base = common.run(common.target_config(cfg, per_class=5, seed=0, steps=2),
                    str(tmp_path / 'base'), keep_final=True)
  assert os.path.isdir(tmp_path / 'base' / 'checkpoints' / '2')
  common._PREFIX_EVAL.clear()
  runs = [common.target_config(cfg, per_class=5, seed=seed, steps=2, depth=2,
                               init_from=str(tmp_path / 'base')) for seed in (0, 1)]
  cached = [common.run(c, str(tmp_path / f'cached{i}')) for i, c in enumerate(runs)]
  assert len(common._PREFIX_EVAL) == 2  # validation and test, shared by both seeds
  assert {k[-1] for k in common._PREFIX_EVAL} == {None, 'test'}
  for i, c in enumerate(runs):
    c.finetune.cache_features = 'off'
    plain = common.run(c, str(tmp_path / f'plain{i}'))
    for key in ('top1', 'test_top1', 'num_eval'):
      assert cached[i][key] == plain[key]
    for key in ('loss', 'test_loss'):
      assert cached[i][key] == pytest.approx(plain[key], rel=1e-5)
  assert len(common._PREFIX_EVAL) == 2
  assert base['num_eval'] == cached[0]['num_eval'] == 1009  # validation[:2000] of digits 5-9


def test_run_all_tasks_pretrain_first_and_split_the_long_experiments():
  cfg = digits.get_config()
  todo = run_all.tasks(cfg, run_all._ORDER)
  labels = [(key, label) for key, label, *_ in todo]
  assert labels[:3] == [('pretrain_batch', ''), ('pretrain_group', ''),
                        ('pretrain_fractaldb_batch', '')]
  assert labels.count(('freeze_sweep', '')) == 1
  assert [l for k, l in labels if k == 'scratch_vs_pretrained'] == ['norm=batch', 'norm=group']
  arch = [l for k, l in labels if k == 'arch_compare']
  assert len(arch) == 6 and arch[-1] == 'timing' and 'googlenet' in arch
  part = dict(((k, l), args) for k, l, _, args in todo)[('arch_compare', 'googlenet')][0]
  assert [m[1] for m in part.arch.models] == ['googlenet']
  only = run_all.tasks(cfg, (svp.NAME,))
  assert [(k, l) for k, l, *_ in only][:2] == [('pretrain_batch', ''), ('pretrain_group', '')]
  cfg.init_from = '/some/checkpoint'
  assert [k for k, *_ in run_all.tasks(cfg, (freeze_sweep.NAME,))] == ['freeze_sweep']
  cfg.tune.experiments = ('freeze_sweep', 'features_l2')
  with pytest.raises(ValueError, match=r"tune.experiments has \['features_l2'\]; the "
                                       r"experiments that select learning rates are"):
    run_all.run_all(cfg, '/nonexistent/out')
  cfg.tune.experiments, cfg.tune.seeds = ('freeze_sweep',), 0
  with pytest.raises(ValueError, match=r'tune.seeds=0: .* integer >= 1'):
    run_all.run_all(cfg, '/nonexistent/out')  # before any directory or training
  with pytest.raises(ValueError, match=r'tune.seeds=0'):
    freeze_sweep.run(cfg, '/nonexistent/out')  # the experiment's own command, before pretraining
  assert not os.path.exists('/nonexistent')


def _arch_row(model, macs, train, infer):
  return dict(family=model[:6], model=model, width=0.125, image_size=16, params=1e5, macs=macs,
              train_img_s=train, infer_img_s=infer, top1=0.9, epochs=6.4,
              val_curve=[0.8, 0.9, 0.95, 0.96], batch=32, backend='cpu')


def test_resnext_finding_normalises_by_macs():
  rows = [_arch_row('resnet50', 2e6, 100.0, 400.0), _arch_row('resnext50_32x4d', 1e6, 25.0, 100.0)]
  text = arch_compare.resnext_finding(rows)
  assert '0.50x the MACs' in text
  assert '2.00x the training time and 2.00x the inference time' in text
  assert 'is slower at equal MACs' in text and '1.5-2x holds' in text
  rows[1]['train_img_s'] = rows[1]['infer_img_s'] = 400.0  # as fast per image: 0.5x per MAC
  assert 'not slower' in arch_compare.resnext_finding(rows)
  assert 'less than the lecture' in arch_compare.resnext_finding(rows)
  rows[1]['train_img_s'] = rows[1]['infer_img_s'] = 20.0  # 2.5x per MAC
  assert 'more than the lecture' in arch_compare.resnext_finding(rows)
  rows[1]['infer_img_s'] = 160.0  # training 2.5x, inference 1.25x
  assert '1.5-2x does not hold for both' in arch_compare.resnext_finding(rows)
  assert 'No ResNeXt' in arch_compare.resnext_finding(rows[:1])
  wider = dict(rows[1], width=1.0)  # a pair must share the width
  assert 'No ResNeXt' in arch_compare.resnext_finding([rows[0], wider])


def test_report_renders_from_fake_result_files(tmp_path):
  out = str(tmp_path)
  for name in (freeze_sweep.NAME, svp.NAME, arch_compare.NAME):
    os.makedirs(os.path.join(out, name))
  common.write_jsonl(os.path.join(out, freeze_sweep.NAME, 'runs.jsonl'),
                     _rows(5, 0, [0.5, 0.6, 0.55]) + _rows(5, 1, [0.7, 0.8, 0.76]) +
                     _rows(50, 0, [0.9, 0.92, 0.91]) + _rows(50, 1, [0.8, 0.81, 0.82]))
  runs = _svp_rows([(1, 0.4), (2, -0.004)], noise=0.01)
  common.write_jsonl(os.path.join(out, svp.NAME, 'runs.jsonl'), runs)
  common.write_jsonl(os.path.join(out, svp.NAME, 'curves.jsonl'),
                     [dict(r, epoch=e, top1=r['top1'] * e / r['schedule'])
                      for r in runs for e in range(1, r['schedule'] + 1)])
  common.write_jsonl(os.path.join(out, arch_compare.NAME, 'rows.jsonl'),
                     [_arch_row('resnet50', 2e6, 100.0, 400.0),
                      _arch_row('resnext50_32x4d', 2e6, 40.0, 200.0)])
  text = open(report.render(out)).read()
  assert '## 1. Freeze-depth sweep' in text and '## 4. Pretraining' in text
  for missing in ('## 2.', '## 3.', '## 5.'):  # no transfer, surgical or features results
    assert missing not in text
  assert 'preset' not in text  # no config.json: run_all did not produce it
  assert 'over 3 seeds' in text and '| best depth (validation) | 1 | 0 |' in text
  assert 'The lecture\'s rule "small target: freeze more, large target: tune more": holds' in text
  assert 'the data cannot tell MNIST-pretrained at 2x from scratch at 2x' in text
  assert '"the gap at 1x is larger than at 2x": holds' in text
  assert '2.50x the training time and 2.00x the inference time' in text
  for figure in ('freeze_sweep.png', 'scratch_vs_pretrained.png'):
    assert f'(figures/{figure})' in text
    with open(os.path.join(out, 'figures', figure), 'rb') as f:
      assert f.read(8) == PNG


def tiny_config():
  """The digits experiments at the smallest size that still runs every code path."""
  c = digits.get_config()
  for section in (c.source, c.target):
    section.model.options.width = 0.0625
    section.data.image_size = 8
  c.source.data.per_class = 10  # 50 images: 2 steps; with the target's lr: the sweep's program
  c.source.optim.learning_rate = c.target.optim.learning_rate
  c.source.train.batch_size = c.target.train.batch_size
  c.fractaldb.model.options.width = 0.0625
  c.fractaldb.data.image_size = 8
  c.fractaldb.data.name = 'fractaldb/c10_m60_s32'
  c.fractaldb.data.per_class = 5  # 50 images at batch 25: 2 steps
  c.fractaldb.train.batch_size = 25
  c.fractaldb.train.num_epochs = 1.0
  for section in (c.surgical.source, c.surgical.target):
    section.model.options.width = 0.0625
    section.data.image_size = 8
  c.surgical.source.data.per_class = 5  # 50 images at batch 25: 1 step in 0.5 epochs
  c.surgical.source.train.batch_size = 25
  c.surgical.per_class, c.surgical.arms, c.surgical.seeds = 5, ('block 1', 'all'), (0, 1)
  c.surgical.steps = 2
  c.freeze.per_class, c.freeze.seeds, c.freeze.steps = (5,), (0, 1), 2
  c.tune.experiments += (transfer_arms.NAME,)  # base B's grid feeds BnB
  c.freeze.depths = (0,)  # one program shared by every run (depths: test_freeze_summary...)
  c.transfer.per_class, c.transfer.depths, c.transfer.seeds, c.transfer.steps = 5, (1,), (0, 1), 2
  c.scratch.per_class, c.scratch.norms, c.scratch.schedules = (5,), ('batch',), (1,)
  c.scratch.steps_1x, c.scratch.num_evals, c.scratch.seeds = 2, 2, (0,)  # freeze depth 0's program
  c.features.k, c.features.queries, c.features.per_class, c.features.seeds = 3, 2, 5, (0, 1)
  c.arch.data = c.target.data  # same view, size and width as the sweep: shared programs
  c.arch.width, c.arch.image_size, c.arch.batch_size, c.arch.steps = 0.0625, 8, 25, 2
  c.arch.timed_rounds = 1
  c.arch.models = (('resnet', 'resnet18', {}),)
  return c


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('experiments'))
  common.enable_compile_cache(os.path.join(out, 'jax_cache'))
  path = run_all.run_all(tiny_config(), out)
  return out, path


def test_tiny_run_writes_every_result(tiny_run):
  out, path = tiny_run
  rows = common.read_jsonl(os.path.join(out, freeze_sweep.NAME, 'runs.jsonl'))
  assert sorted((r['depth'], r['seed']) for r in rows) == [(0, 0), (0, 1)]
  assert all(0.0 <= r['top1'] <= 1.0 and 0.0 <= r['val_top1'] <= 1.0 and r['num_train'] == 25
             for r in rows)
  assert {r['frozen'] for r in rows} == {'-'}
  grid = common.read_jsonl(os.path.join(out, freeze_sweep.NAME, 'lr_grid.jsonl'))
  assert [(g['seed'], g['lr']) for g in grid] == [(0, 0.0125), (0, 0.05), (0, 0.2)]
  best = max(grid, key=lambda g: g['val_top1'])  # ties: the first
  assert {r['lr'] for r in rows} == {best['lr']} and rows[0]['val_top1'] == best['val_top1']
  arms = common.read_jsonl(os.path.join(out, transfer_arms.NAME, 'runs.jsonl'))
  assert sorted((r['arm'], r['depth'], r['seed']) for r in arms) == [
      (a, d, s) for a, d in (('AnB', 1), ('AnB+', 1), ('BnB', 1), ('base B', 0)) for s in (0, 1)]
  assert all(0.0 <= r['top1'] <= 1.0 and r['num_train'] == 25 for r in arms)
  curves = common.read_jsonl(os.path.join(out, svp.NAME, 'curves.jsonl'))
  assert sorted((c['init'], c['epoch']) for c in curves) == [
      (i, e) for i in ('fractaldb', 'pretrained', 'scratch') for e in (1.0, 2.0)]
  feats = common.read_json(os.path.join(out, features_l2.NAME, 'results.json'))['rows']
  assert sorted((r['network'], r['seed']) for r in feats) == [
      (n, s) for n in ('pixels', 'pretrained', 'random') for s in (0, 1)]
  assert all(0 <= r['knn_top1'] <= 1 and 0 <= r['probe_top1'] <= 1 and r['num_train'] == 25
             and r['probe_grad_norm'] < 1e-5 for r in feats)
  assert {r['dims'] for r in feats if r['network'] != 'pixels'} == {32}
  (arch,) = common.read_jsonl(os.path.join(out, arch_compare.NAME, 'rows.jsonl'))
  assert arch['params'] > 0 and arch['macs'] > 0 and arch['train_img_s'] > 0
  surgery = common.read_jsonl(os.path.join(out, surgical.NAME, 'runs.jsonl'))
  assert sorted((r['arm'], r['seed']) for r in surgery) == [
      (a, s) for a in ('all', 'block 1') for s in (0, 1)]
  assert all(0.0 <= r['top1'] <= 1.0 and r['num_train'] == 50 for r in surgery)
  text = open(path).read()
  assert 'preset `default` of the `digits` experiment config' in text
  assert ('Every arm (a cell of a table) of freeze_sweep, surgical, scratch_vs_pretrained, '
          'transfer_arms runs at the learning rate it selects on validation: its first seed at '
          '0.25, 1, 4 times the configured rate') in text
  for section in ('## 1.', '## 2.', '## 3.', '## 4.', '## 5.', '## 6.'):
    assert section in text
  for figure in ('freeze_sweep.png', 'transfer_arms.png', 'surgical.png',
                 'scratch_vs_pretrained.png', 'knn_grid.png'):
    with open(os.path.join(out, 'figures', figure), 'rb') as f:
      assert f.read(8) == PNG


def test_tiny_run_resumes_only_unfinished_runs(tiny_run):
  out, _ = tiny_run
  runs_dir = os.path.join(out, freeze_sweep.NAME, 'runs')
  # Seed 0 ran at the three rates of the grid, seed 1 at the chosen one.
  (seed1,) = [n for n in os.listdir(runs_dir) if n.startswith('n5_d0_s1_')]
  keep = [os.path.join(runs_dir, n, 'results.json') for n in os.listdir(runs_dir)
          if n.startswith('n5_d0_s0_')]
  assert len(keep) == 3
  redo = os.path.join(runs_dir, seed1, 'results.json')
  os.remove(redo)
  before = [os.path.getmtime(k) for k in keep]
  rows = freeze_sweep.run(tiny_config(), out)
  assert os.path.exists(redo) and [os.path.getmtime(k) for k in keep] == before
  assert len(rows) == 2 and seed1 == f'n5_d0_s1_lr{rows[1]["lr"]:.4g}'
  with open(redo) as f:
    assert json.load(f)['steps'] == 2


def _fields(rows):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]


def test_run_all_in_two_processes_gives_the_results_of_one(tmp_path):
  """Two worker processes share one source pretraining (the second waits for its lock) and give
  the same numbers, bit for bit, as one process running the experiments in turn."""
  code = ('import sys; sys.path.insert(0, "tests"); from experiments import common, run_all; '
          'from test_experiments import tiny_config; '
          'only = ("freeze_sweep", "features_l2"); '
          'run_all.run_all(tiny_config(), sys.argv[1], only, jobs=2); '
          'run_all.run_all(tiny_config(), sys.argv[2], only, jobs=1)')
  two, one = str(tmp_path / 'two'), str(tmp_path / 'one')
  subprocess.run([sys.executable, '-c', code, two, one], capture_output=True, text=True,
                 cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True)
  for out in (two, one):
    assert sorted(common.read_json(os.path.join(out, 'timings.json'))) == [
        'features_l2', 'freeze_sweep', 'pretrain_batch', 'wall']
  sweep = [common.read_jsonl(os.path.join(out, freeze_sweep.NAME, 'runs.jsonl'))
           for out in (two, one)]
  assert len(sweep[0]) == 2 and _fields(sweep[0]) == _fields(sweep[1])
  feats = [common.read_json(os.path.join(out, features_l2.NAME, 'results.json'))['rows']
           for out in (two, one)]
  assert len(feats[0]) == 6 and _fields(feats[0]) == _fields(feats[1])
  pretrained = [common.read_json(os.path.join(out, 'pretrain_batch', 'results.json'))['top1']
                for out in (two, one)]
  assert pretrained[0] == pretrained[1]
