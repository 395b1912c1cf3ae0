"""What a run shows and keeps: a progress bar, `metrics.jsonl`, TensorBoard events, results files.

Only process 0 writes, so a multi-host run produces one set of files.
"""

import json
import os
import time

import jax
import numpy as np
import tqdm
from flax.metrics import tensorboard


class Reporter:
  """Writes every logged point to `WORKDIR/metrics.jsonl` and TensorBoard, and drives tqdm."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int, progress: bool = True):
    self.active = jax.process_index() == 0
    self.progress = progress and self.active
    self.workdir = workdir
    if self.active:
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, disable=not self.progress,
                          unit='step', dynamic_ncols=True)
    self._last = (time.perf_counter(), initial_step)

  def advance(self, step: int):
    self._bar.update(step - self._bar.n)

  def throughput(self, step: int, batch_size: int) -> float:
    """Images per second since the previous call (host wall clock)."""
    now = time.perf_counter()
    then, then_step = self._last
    self._last = (now, step)
    return (step - then_step) * batch_size / max(now - then, 1e-9)

  def write(self, split: str, step: int, metrics: dict):
    """One point: a JSON line `{"split", "step", **metrics}` and TensorBoard scalars."""
    metrics = {k: float(v) for k, v in metrics.items()}
    if split == 'train':
      self._bar.set_postfix({k: f'{v:.4g}' for k, v in metrics.items() if k != 'lr'})
    elif self.progress:
      self._bar.write(f'step {step} {split}: ' + ', '.join(f'{k}={v:.4f}'
                                                            for k, v in metrics.items()))
    if not self.active:
      return
    self._jsonl.write(json.dumps({'split': split, 'step': step, **metrics}) + '\n')
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.scalar(f'{split}/{k}', v, step)
    self._tb.flush()

  def close(self):
    self._bar.close()
    if self.active:
      self._jsonl.close()
      self._tb.close()


def write_results(workdir: str, results: dict):
  """`results.json` for programs and `results.md` (a two-column table) for people."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'results.json')
  with open(path + '.tmp', 'w') as f:  # a rename: a reader never sees half a file
    json.dump(results, f, indent=2, default=_plain)
  os.replace(path + '.tmp', path)
  rows = '\n'.join(f'| {k} | {_fmt(v)} |' for k, v in results.items())
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f'| result | value |\n|---|---|\n{rows}\n')


def _plain(v):
  return v.item() if isinstance(v, np.generic) else str(v)


def _fmt(v):
  if isinstance(v, float):
    return f'{v:.4f}'
  if isinstance(v, int):
    return f'{v:,}'
  return str(v)
