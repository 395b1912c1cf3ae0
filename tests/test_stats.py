"""Tests of experiments.stats against scipy computed independently and a hand-computed case."""

import math
import re

import numpy as np
import pytest
import scipy.stats

from experiments import stats

EFFECT_WORDS = re.compile(r'\b(above|below)\b')


def test_interval_hand_computed():
  # values [1, 2, 3, 4, 5]: mean 3; s^2 = (4 + 1 + 0 + 1 + 4) / 4 = 2.5; sem = sqrt(2.5 / 5)
  # = sqrt(0.5) = 0.70710678...; t_{0.975, 4} = 2.776445105198 (printed t tables: 2.776);
  # half-width = 2.776445105198 * sqrt(2.5) / sqrt(5) = 1.963243161478, so
  # the interval is [3 - 1.963243161478, 3 + 1.963243161478] = [1.036756838522, 4.963243161478].
  iv = stats.mean_interval([1, 2, 3, 4, 5])
  assert iv.n == 5 and iv.mean == 3.0 and iv.confidence == 0.95
  assert iv.half_width == pytest.approx(1.963243161478, abs=1e-11)
  assert iv.low == pytest.approx(1.036756838522, abs=1e-11)
  assert iv.high == pytest.approx(4.963243161478, abs=1e-11)
  assert iv.format(3) == '3.000 [1.037, 4.963]'
  assert iv.format(1, scale=100) == '300.0 [103.7, 496.3]'


@pytest.mark.parametrize('confidence', [0.9, 0.95, 0.99])
@pytest.mark.parametrize('n', [2, 3, 5, 10, 30])
def test_interval_matches_scipy(n, confidence):
  x = np.random.default_rng(1000 * n + int(100 * confidence)).normal(0.8, 0.05, size=n)
  iv = stats.mean_interval(x, confidence)
  # two independent routes through scipy: the t distribution's interval and the t-test's CI
  lo, hi = scipy.stats.t.interval(confidence, n - 1, loc=x.mean(), scale=x.std(ddof=1) / math.sqrt(n))
  ci = scipy.stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
  assert (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-12)
  assert (iv.low, iv.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
  assert iv.mean == pytest.approx(x.mean(), rel=1e-12) and iv.n == n


def test_n1_is_infinite_and_cannot_tell():
  iv = stats.mean_interval([0.9])
  assert iv.mean == 0.9 and iv.n == 1
  assert iv.low == -math.inf and iv.high == math.inf
  assert stats.verdict(iv) == 'cannot tell'
  s = stats.sentence('freeze depth 3', 'depth 2', iv)
  assert s.startswith('the data cannot tell freeze depth 3 from depth 2')
  assert '1 paired seed' in s and not EFFECT_WORDS.search(s)
  assert stats.claim('rule', 'greater', iv, 'x beats y')['status'] == 'cannot tell here'


def test_n0_and_bad_inputs_raise():
  with pytest.raises(ValueError, match='no values'):
    stats.mean_interval([])
  with pytest.raises(ValueError, match='non-finite'):
    stats.mean_interval([0.5, float('nan')])
  with pytest.raises(ValueError, match='confidence'):
    stats.mean_interval([1, 2], confidence=95)
  with pytest.raises(ValueError, match='no values'):
    stats.paired_difference({}, {})
  with pytest.raises(ValueError, match="'greater' or 'less'"):
    stats.claim('c', 'equal', stats.mean_interval([1, 2]), 's')


def test_constant_values_give_a_point_interval():
  assert stats.verdict(stats.mean_interval([0.02] * 5)) == 'greater'
  iv = stats.mean_interval([0.0] * 5)
  assert (iv.low, iv.high) == (0.0, 0.0) and stats.verdict(iv) == 'cannot tell'


# Seed-to-seed variation (the target subset) is large and shared by both arms; arm a is about
# 2 points better on every seed. Pairing sees the 2 points; the unpaired interval does not.
A = {0: 0.80, 1: 0.90, 2: 0.70, 3: 0.85, 4: 0.75}
B = {s: A[s] - 0.02 + d for s, d in zip(A, [0.004, -0.003, 0.002, -0.004, 0.001])}


def test_paired_difference_is_one_sample_interval_of_differences():
  iv = stats.paired_difference(A, B)
  diffs = [A[s] - B[s] for s in sorted(A)]
  one = stats.mean_interval(diffs)
  assert (iv.mean, iv.low, iv.high, iv.n) == pytest.approx((one.mean, one.low, one.high, 5))
  rel = scipy.stats.ttest_rel(list(A.values()), [B[s] for s in A]).confidence_interval()
  assert (iv.low, iv.high) == pytest.approx((rel.low, rel.high), rel=1e-10)
  # dict order does not matter: pairing is by seed, not by position
  shuffled = {s: B[s] for s in [3, 1, 4, 0, 2]}
  assert stats.paired_difference(A, shuffled) == iv


def test_pairing_matters():
  paired = stats.paired_difference(A, B)
  unpaired = scipy.stats.ttest_ind(list(A.values()), list(B.values()), equal_var=False)
  unpaired = unpaired.confidence_interval()
  assert stats.verdict(paired) == 'greater'
  assert unpaired.low < 0 < unpaired.high  # unpaired, the same data cannot tell
  assert paired.high - paired.low < 0.1 * (unpaired.high - unpaired.low)


def test_mismatched_seeds_raise_naming_them():
  b = {s: v for s, v in B.items() if s != 3}
  b[7] = 0.5
  with pytest.raises(ValueError) as err:
    stats.paired_difference(A, b, labels=('depth 3', 'depth 2'))
  msg = str(err.value)
  assert 'only in depth 3: [3]' in msg and 'only in depth 2: [7]' in msg
  with pytest.raises(ValueError, match=r'only in a: \[\]; only in b: \[5\]'):
    stats.paired_difference(A, {**B, 5: 0.1})


def test_one_common_seed_cannot_tell():
  iv = stats.paired_difference({0: 0.9}, {0: 0.5})
  assert iv.n == 1 and stats.verdict(iv) == 'cannot tell'


def test_verdict():
  iv = lambda lo, hi: stats.Interval((lo + hi) / 2, lo, hi, 5)
  assert stats.verdict(iv(0.01, 0.03)) == 'greater'
  assert stats.verdict(iv(-0.03, -0.01)) == 'less'
  assert stats.verdict(iv(-0.01, 0.03)) == 'cannot tell'
  assert stats.verdict(iv(0.0, 0.03)) == 'cannot tell'  # touching zero is not excluding it
  assert stats.verdict(iv(-0.03, 0.0)) == 'cannot tell'
  assert stats.verdict(stats.Interval(math.nan, math.nan, math.nan, 5)) == 'cannot tell'


def test_sentences():
  up = stats.Interval(0.041, 0.012, 0.070, 5)
  assert stats.sentence('freeze depth 3', 'depth 2', up) == (
      'freeze depth 3 is 4.1 top-1 points above depth 2 (95 % CI 1.2 to 7.0, 5 paired seeds)')
  down = stats.Interval(-0.041, -0.070, -0.012, 5)
  assert stats.sentence('freeze depth 3', 'depth 2', down) == (
      'freeze depth 3 is 4.1 top-1 points below depth 2 (95 % CI 1.2 to 7.0, 5 paired seeds)')
  unsure = stats.Interval(0.011, -0.020, 0.042, 5)
  assert stats.sentence('freeze depth 3', 'depth 2', unsure, unit='points') == (
      'the data cannot tell freeze depth 3 from depth 2 '
      '(difference +1.1 points, 95 % CI -2.0 to 4.2, 5 paired seeds)')
  # a bound that excludes zero never prints as 0.0
  tiny = stats.Interval(0.02, 0.00004, 0.04, 5)
  assert '95 % CI 0.004 to 4.0' in stats.sentence('a', 'b', tiny)


def test_claims():
  up = stats.Interval(0.041, 0.012, 0.070, 5)
  unsure = stats.Interval(0.011, -0.020, 0.042, 5)
  c = stats.claim('Yosinski et al. 2014', 'greater', up, 'AnB+ beats BnB')
  assert c['status'] == 'holds' and c['verdict'] == 'greater' and c['n'] == 5
  assert c['sentence'] == ('Yosinski et al. 2014, "AnB+ beats BnB": holds (predicted greater; '
                           'difference +4.1 top-1 points, 95 % CI 1.2 to 7.0, 5 paired seeds).')
  assert stats.claim('rule', 'less', up, 's')['status'] == 'does not hold'
  assert stats.claim('rule', 'greater', unsure, 's')['status'] == 'cannot tell here'
  assert stats.claim('rule', 'less', unsure, 's')['status'] == 'cannot tell here'


def test_never_claims_an_effect_when_interval_includes_zero():
  rng = np.random.default_rng(0)
  counts = {'cannot tell': 0, 'greater': 0, 'less': 0}
  for _ in range(1000):
    n = int(rng.integers(1, 12))
    values = rng.normal(rng.normal(0, 0.02), rng.uniform(0.001, 0.05), size=n)
    if rng.random() < 0.05:  # exact zeros on the boundary
      values = np.zeros(n)
    iv = stats.mean_interval(values)
    s = stats.sentence('freeze depth 3', 'depth 2', iv, digits=int(rng.integers(0, 4)))
    c = stats.claim('rule', str(rng.choice(['greater', 'less'])), iv, 'freeze more')
    counts[stats.verdict(iv)] += 1
    if iv.low <= 0 <= iv.high:
      assert not EFFECT_WORDS.search(s), s
      assert s.startswith('the data cannot tell')
      assert c['status'] == 'cannot tell here'
    else:
      assert EFFECT_WORDS.search(s), s
      assert c['status'] in ('holds', 'does not hold')
      assert (c['status'] == 'holds') == (c['prediction'] == stats.verdict(iv))
  assert min(counts.values()) > 50  # the random intervals exercise all three verdicts
