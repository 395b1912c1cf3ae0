"""Intervals, paired differences and the sentences the report draws from them.

Method. Every cell of a table is run with several seeds; a cell reports the mean over seeds with
a Student's t confidence interval on that mean (Student 1908, "The probable error of a mean",
Biometrika 6(1)): for n values with mean m and sample standard deviation s (ddof = 1),

    m +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n),

with the t quantile taken from `scipy.stats.t`. The interval assumes the per-seed values are
independent draws; it is exact for normal values and approximate otherwise.

Comparisons are paired. A seed fixes the target subset, the head initialisation and the data
order, and every arm of one seed shares them, so arm A and arm B are compared by the per-seed
differences a_s - b_s and the interval is the one-sample t interval of those differences (the
paired t interval, as `scipy.stats.ttest_rel` gives). Seed-to-seed variation common to both arms
cancels, which is why this interval is usually much narrower than the unpaired one. Pairing never
drops data: if the two arms were not run on the same seeds, `paired_difference` raises and names
the seeds that only one arm has.

Reading an interval. An effect is called only when the interval excludes zero (`verdict`); when
it includes zero the sentence says the data cannot tell the arms apart, whatever the mean. With
one value there is no spread to estimate: the interval is (-inf, inf), which includes zero, so it
always reads "cannot tell". If all n >= 2 values are identical the interval is the single point
[m, m] (the limit of the formula as s -> 0): an effect if m != 0, "cannot tell" if m == 0.
Non-finite values (NaN, inf) are refused rather than propagated.

Named claims (the lecture's rule "small target -> freeze more", He et al. 2019, Yosinski et al.
2014, Lee et al. 2023) are checked by `claim`: a claim predicts the sign of one paired difference
and holds, does not hold, or cannot be told here. A claim of *no* difference cannot be confirmed
this way (an interval that includes zero is absence of evidence, not evidence of equality); state
such claims as a directional prediction, or report them as "cannot tell here".
"""

import dataclasses
import math

import numpy as np
import scipy.stats

GREATER, LESS, CANNOT_TELL = 'greater', 'less', 'cannot tell'
HOLDS, DOES_NOT_HOLD, CANNOT_TELL_HERE = 'holds', 'does not hold', 'cannot tell here'


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean over n values with its confidence interval [low, high] (n = 1: (-inf, inf))."""
  mean: float
  low: float
  high: float
  n: int
  confidence: float = 0.95

  @property
  def half_width(self):
    return (self.high - self.low) / 2

  def format(self, digits=3, scale=1.0):
    """E.g. '0.912 [0.887, 0.937]'; `scale=100` writes fractions as percentage points."""
    m, lo, hi = (scale * v for v in (self.mean, self.low, self.high))
    return f'{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]'


def mean_interval(values, confidence=0.95):
  """Student-t interval on the mean of `values` (n = 1 gives (-inf, inf); n = 0 raises)."""
  if not 0 < confidence < 1:
    raise ValueError(f'confidence must lie in (0, 1), got {confidence!r}')
  x = np.asarray(list(values), dtype=np.float64)
  if x.ndim != 1:
    raise ValueError(f'mean_interval expects a flat sequence of numbers, got shape {x.shape}')
  n = len(x)
  if n == 0:
    raise ValueError('mean_interval: no values (n = 0); a mean needs at least one run')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'mean_interval: non-finite values {x.tolist()}')
  mean = float(np.mean(x))
  if n == 1:
    return Interval(mean, -math.inf, math.inf, 1, confidence)
  sem = float(scipy.stats.sem(x))  # s / sqrt(n), s with ddof = 1
  if sem == 0.0:
    return Interval(mean, mean, mean, n, confidence)
  low, high = scipy.stats.t.interval(confidence, df=n - 1, loc=mean, scale=sem)
  return Interval(mean, float(low), float(high), n, confidence)


def _sorted(keys):
  try:
    return sorted(keys)
  except TypeError:
    return sorted(keys, key=repr)


def paired_difference(a, b, confidence=0.95, labels=('a', 'b')):
  """Interval on mean over seeds of a[seed] - b[seed]; `a`, `b` map seed -> value.

  Raises ValueError naming the seeds only one arm has (`labels` name the arms in the message);
  with one seed the interval is (-inf, inf), i.e. "cannot tell".
  """
  only_a, only_b = set(a) - set(b), set(b) - set(a)
  if only_a or only_b:
    raise ValueError(
        f'paired_difference: the arms were not run on the same seeds; '
        f'only in {labels[0]}: {_sorted(only_a)}; only in {labels[1]}: {_sorted(only_b)}')
  seeds = _sorted(a)
  return mean_interval([a[s] - b[s] for s in seeds], confidence)


def verdict(interval):
  """'greater' if the interval lies above zero, 'less' if below, else 'cannot tell'."""
  if interval.low > 0:  # NaN bounds compare False and fall through to 'cannot tell'
    return GREATER
  if interval.high < 0:
    return LESS
  return CANNOT_TELL


def _num(x, digits):
  """`x` to `digits` decimals, or to 2 significant digits where that would read as zero."""
  text = f'{x:.{digits}f}'
  if x != 0 and float(text) == 0 and math.isfinite(x):
    text = f'{x:.2g}'
  return text


def _evidence(interval, unit, scale, digits, magnitude):
  """'(95 % CI 1.2 to 7.0, 5 paired seeds)' or, with magnitude=False, the signed difference."""
  n = interval.n
  seeds = f'{n} paired seed' + ('' if n == 1 else 's')
  level = f'{100 * interval.confidence:g} % CI'
  if magnitude:  # bounds of |difference| in the stated direction
    lo, hi = sorted((abs(scale * interval.low), abs(scale * interval.high)))
    return f'({level} {_num(lo, digits)} to {_num(hi, digits)}, {seeds})'
  diff = f'difference {scale * interval.mean:+.{digits}f} {unit}'
  if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
    return f'({diff}, {seeds}: no interval)'
  return (f'({diff}, {level} {_num(scale * interval.low, digits)} to '
          f'{_num(scale * interval.high, digits)}, {seeds})')


def sentence(what_a, what_b, interval, unit='top-1 points', scale=100, digits=1):
  """One sentence on the paired difference a - b; an effect only if the interval excludes 0.

  'freeze depth 3 is 4.1 top-1 points above depth 2 (95 % CI 1.2 to 7.0, 5 paired seeds)', or
  'the data cannot tell freeze depth 3 from depth 2 (difference +1.1 top-1 points, 95 % CI -2.0
  to 4.2, 5 paired seeds)'. In an effect sentence the CI bounds are the size of the difference in
  the stated direction.
  """
  v = verdict(interval)
  if v == CANNOT_TELL:
    return (f'the data cannot tell {what_a} from {what_b} '
            f'{_evidence(interval, unit, scale, digits, magnitude=False)}')
  direction = 'above' if v == GREATER else 'below'
  size = _num(abs(scale * interval.mean), digits)
  return (f'{what_a} is {size} {unit} {direction} {what_b} '
          f'{_evidence(interval, unit, scale, digits, magnitude=True)}')


def claim(name, prediction, interval, statement, unit='top-1 points', scale=100, digits=1):
  """Check a named claim that predicts the sign of a paired difference.

  `prediction` is 'greater' or 'less' (the sign the claim predicts for the difference that
  `interval` measures). Returns a dict with the claim, the status ('holds' when the verdict equals
  the prediction, 'does not hold' when it has the opposite sign, 'cannot tell here' when the
  interval includes zero), the interval and a sentence stating claim and evidence.
  """
  if prediction not in (GREATER, LESS):
    raise ValueError(f"claim prediction must be 'greater' or 'less', got {prediction!r}")
  v = verdict(interval)
  status = CANNOT_TELL_HERE if v == CANNOT_TELL else HOLDS if v == prediction else DOES_NOT_HOLD
  evidence = _evidence(interval, unit, scale, digits, magnitude=False)
  return {
      'name': name,
      'statement': statement,
      'prediction': prediction,
      'status': status,
      'verdict': v,
      'mean': interval.mean,
      'low': interval.low,
      'high': interval.high,
      'n': interval.n,
      'confidence': interval.confidence,
      'sentence': f'{name}, "{statement}": {status} (predicted {prediction}; {evidence[1:-1]}).',
  }
