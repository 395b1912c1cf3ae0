"""A run's working directory: one run at a time, its recorded config, and stopping cleanly.

Re-running a command resumes its workdir, so the workdir must not silently mix two runs: `Lock`
holds an exclusive lock on the workdir for the run's life, so a second run started on the
same workdir refuses at once, and `claim` refuses a workdir that holds a run of another config
unless told to `resume` it under the new config (e.g. a longer schedule) or `restart` (the old
run is moved aside, not deleted).
"""

import errno
import fcntl
import json
import os
import signal
import tempfile
import threading
import time

import jax
from jax.experimental import multihost_utils
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


def make(workdir: str) -> None:
  """Creates the workdir, or raises a one-line error saying why it cannot be used."""
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK | os.X_OK):
      raise PermissionError(errno.EACCES, 'not writable')
  except OSError as e:
    if os.path.isfile(workdir):
      raise ValueError(f'--workdir={workdir} cannot be used: it is a file; choose another '
                       '--workdir or move the file away.') from None
    raise ValueError(f'--workdir={workdir} cannot be used ({e.strerror}); choose a directory '
                     'this user can create and write, e.g. --workdir=runs/NAME.') from None


class Lock:
  """An exclusive `flock` on the workdir itself, held while a run uses it (process 0 only).

  The kernel releases it when the process dies, however it dies, so a killed run never leaves
  a stale lock behind, and nothing is added to the workdir.
  """

  def __init__(self, workdir: str):
    self.workdir, self._fd = workdir, None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    self._fd = os.open(self.workdir, os.O_RDONLY)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise RuntimeError(f'--workdir={self.workdir} is in use by another run; wait for it to '
                         'finish, or use another --workdir.') from None
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)  # releases the lock


def claim(workdir: str, config: ConfigDict, on_change: str = 'refuse'):
  """Writes WORKDIR/config.json (the workdir exists, see `make`), after checking any run
  already there used the same config."""
  if on_change not in ON_CHANGE:
    raise ValueError(f'on_config_change={on_change!r}; choose one of {ON_CHANGE}.')
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json())
  old = json.load(open(path)) if os.path.exists(path) else None
  _all_hosts_reach('read config.json')  # every host reads it before process 0 rewrites it
  if old is not None:
    a, b = _flatten(old), _flatten(new)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if changed and on_change == 'refuse':
      diff = '; '.join(f'{k}: {a.get(k)!r} -> {b.get(k)!r}' for k in changed[:6])
      raise ValueError(
          f'{workdir} holds a run with a different config ({diff}). Use another --workdir, '
          'or --on_config_change=resume to continue its checkpoints under the new config, or '
          '--on_config_change=restart to move the old run aside and start afresh.')
    if changed and jax.process_index() == 0:
      # mkdtemp: unique even when two changes come within the same second.
      aside = tempfile.mkdtemp(prefix=f'previous-{time.strftime("%Y%m%d-%H%M%S")}-', dir=workdir)
      moved = _RUN_FILES if on_change == 'restart' else ()
      for name in ('config.json',) + moved:
        if os.path.exists(os.path.join(workdir, name)):
          os.rename(os.path.join(workdir, name), os.path.join(aside, name))
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(new, f, indent=2)
  _all_hosts_reach('claimed')  # no host looks for checkpoints while process 0 moves them


def _all_hosts_reach(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'rundir.claim: {name}')


class Preemption:
  """Turns SIGTERM (Slurm, Kubernetes, preemptible VMs) and SIGINT (Ctrl-C) into a stop at a
  step boundary, after a checkpoint; a second Ctrl-C interrupts at once.

  On one host a Python handler sets a flag. On several hosts every host must stop at the same
  step, or the others wait forever in the next collective: jax.distributed's preemption service
  catches SIGTERM on any host and agrees with the others on the step to stop at.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal_name = None  # 'SIGTERM' or 'SIGINT' once one arrived
    self._previous = {}

  def __enter__(self):
    single = jax.process_count() == 1
    if single and threading.current_thread() is threading.main_thread():  # signals reach only it
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signum, frame):
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested, self.signal_name = True, signal.Signals(signum).name

  def stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; call it once per step, on every host."""
    if jax.process_count() > 1 and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
      self.signal_name = 'SIGTERM' if self.requested else None
    return self.requested

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
