"""A run's working directory: its recorded config, and stopping cleanly when preempted.

Re-running a command resumes its workdir, so the workdir must not silently mix two configs:
`claim` refuses a workdir that holds a run of another config unless told to `resume` it under
the new config (e.g. a longer schedule) or `restart` (the old run is moved aside, not deleted).
"""

import json
import os
import signal
import threading
import time

import jax
from ml_collections import ConfigDict

ON_CHANGE = ('refuse', 'resume', 'restart')
_RUN_FILES = ('checkpoints', 'best', 'tensorboard', 'metrics.jsonl', 'results.json',
              'results.md')


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def claim(workdir: str, config: ConfigDict, on_change: str = 'refuse'):
  """Writes WORKDIR/config.json, after checking any run already there used the same config."""
  if on_change not in ON_CHANGE:
    raise ValueError(f'on_config_change={on_change!r}; choose one of {ON_CHANGE}.')
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json())
  if os.path.exists(path):
    old = json.load(open(path))
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if changed and on_change == 'refuse':
      diff = '; '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in changed[:6])
      raise ValueError(
          f'{workdir} holds a run with a different config ({diff}). Use another --workdir, '
          'or --on_config_change=resume to continue its checkpoints under the new config, or '
          '--on_config_change=restart to move the old run aside and start afresh.')
    if changed and jax.process_index() == 0:
      aside = os.path.join(workdir, f'previous-{time.strftime("%Y%m%d-%H%M%S")}')
      os.makedirs(aside)
      moved = _RUN_FILES if on_change == 'restart' else ()
      for name in ('config.json',) + moved:
        if os.path.exists(os.path.join(workdir, name)):
          os.rename(os.path.join(workdir, name), os.path.join(aside, name))
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(new, f, indent=2)


class Preemption:
  """Turns SIGTERM (Slurm, Kubernetes, preemptible VMs) into a flag checked between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals reach only that one
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
