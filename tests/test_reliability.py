"""Reliability of a run: kill and resume, preemption, divergence, bad input, many hosts.

What is about processes runs real `python -m cnn_arch.main` subprocesses (SIGKILL, SIGTERM,
jax.distributed on loopback); the rest runs in-process. Every run is the tiny ResNet-18 of
tests/test_train.py; runs are shared between tests through module-scoped fixtures.
"""

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_arch import checkpoint, input_pipeline, optim, rundir, train
from cnn_arch.train_setup import make_setup
from tests.test_train import leaves_equal, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = '''import json, sys
sys.path.insert(0, {root!r})
from tests.test_train import tiny_config
def get_config():
  return tiny_config(**json.loads({sections!r}))
'''
# 30 steps, a checkpoint every 2, evaluation only at the end: room to interrupt it five times.
KILL = dict(train=dict(num_epochs=6.0, eval_every_epochs=100.0),
            checkpoint=dict(every_steps=2, keep=2, keep_best=False))
# Kills the process inside its second checkpoint save, after the files are written and before
# orbax's atomic rename: the state a SIGKILL in the middle of a save leaves behind.
KILL_IN_SAVE = '''
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity
finalize, calls = atomicity.AtomicRenameTemporaryPath.finalize, []
async def dying_finalize(self, *args, **kwargs):
  if self.get_final().name.isdigit():  # a step, not one of its items
    calls.append(self)
  if len(calls) == 2:
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = dying_finalize
sys.argv[0] = 'cnn_arch.main'
runpy.run_module('cnn_arch.main', run_name='__main__')
'''


def config_file(directory, name: str, sections: dict) -> str:
  path = os.path.join(directory, f'{name}.py')
  with open(path, 'w') as f:
    f.write(CONFIG_FILE.format(root=ROOT, sections=json.dumps(sections)))
  return path


def cpu_env(devices: int = 1) -> dict:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def start(args: list, log: str, env: dict | None = None) -> subprocess.Popen:
  """A training process; its output goes to `log` (a pipe could fill and block it)."""
  with open(log, 'w') as out:
    return subprocess.Popen([sys.executable] + args, cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT, env=env or cpu_env())


def finish(proc: subprocess.Popen, log: str, timeout: float = 300) -> str:
  proc.wait(timeout)
  return open(log).read()


def steps(directory) -> list:
  """Complete (finalised) checkpoint steps, read from the directory names."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def wait_until(predicate, proc: subprocess.Popen, log: str, timeout: float = 300):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f'Run ended (rc {proc.poll()}) before the moment to interrupt it:\n'
                           + open(log).read()[-3000:])
    time.sleep(0.01)


def resumed_from(log_text: str) -> int | None:
  found = re.findall(r'Resuming from checkpoint step (\d+)', log_text)
  return int(found[-1]) if found else None


def metrics(workdir) -> list:
  return [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]


########## Kill, preemption and unreadable checkpoints: one run interrupted four ways.


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  return workdir, train.train_and_evaluate(tiny_config(**KILL), workdir)


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory):
  """The same command run until done: SIGTERM, SIGINT, SIGKILL, SIGKILL mid-save, a damaged
  checkpoint."""
  tmp = str(tmp_path_factory.mktemp('interrupted'))
  workdir, ckpts = os.path.join(tmp, 'run'), os.path.join(tmp, 'run', 'checkpoints')
  args = ['-m', 'cnn_arch.main', f'--config={config_file(tmp, "kill", KILL)}',
          f'--workdir={workdir}']
  seen, logs = {}, [os.path.join(tmp, f'{i}.log') for i in range(5)]
  for i, name in enumerate(('sigterm', 'sigint')):  # 1, 2: once a new checkpoint exists
    before = max(steps(ckpts), default=0)
    proc = start(args, logs[i])
    wait_until(lambda: max(steps(ckpts), default=0) > before, proc, logs[i])
    proc.send_signal(getattr(signal, name.upper()))
    seen[name] = dict(log=finish(proc, logs[i]), rc=proc.returncode, steps=steps(ckpts),
                      metrics=metrics(workdir))
  first = max(steps(ckpts))
  proc = start(args, logs[2])  # 3: SIGKILL once two more checkpoints exist
  wait_until(lambda: sum(s > first for s in steps(ckpts)) >= 2, proc, logs[2])
  proc.kill()
  seen['sigkill'] = dict(log=finish(proc, logs[2]), rc=proc.returncode, steps=steps(ckpts))
  proc = start(['-c', KILL_IN_SAVE] + args[2:], logs[3])  # 4: SIGKILL inside a save
  seen['in_save'] = dict(log=finish(proc, logs[3]), rc=proc.returncode, steps=steps(ckpts),
                         names=sorted(os.listdir(ckpts)))
  damaged = max(steps(ckpts))  # 5: the newest complete step loses a file; run to the end
  os.remove(os.path.join(ckpts, str(damaged), 'variables', 'manifest.ocdbt'))
  proc = start(args, logs[4])
  seen['final'] = dict(log=finish(proc, logs[4]), rc=proc.returncode, damaged=damaged)
  return workdir, seen


@pytest.mark.parametrize('name, resumed_by', [('sigterm', 'sigint'), ('sigint', 'sigkill')])
def test_sigterm_and_sigint_save_the_step_reached_and_exit_cleanly(interrupted, name,
                                                                   resumed_by):
  _, seen = interrupted
  run = seen[name]
  assert run['rc'] == 0, run['log'][-3000:]
  assert f'Stopped early by {name.upper()}' in run['log'] and 'preempted=True' in run['log']
  stopped = [m['step'] for m in run['metrics'] if m['split'] == 'preempted']
  last_trained = [m['step'] for m in run['metrics'] if m['split'] == 'train'][-1]
  assert stopped[-1] == last_trained == max(run['steps']) and last_trained < 30
  assert resumed_from(seen[resumed_by]['log']) == last_trained  # the restart loses no step


def test_sigkill_resumes_from_the_latest_complete_checkpoint(interrupted):
  _, seen = interrupted
  assert seen['sigkill']['rc'] == -signal.SIGKILL
  assert resumed_from(seen['in_save']['log']) == max(seen['sigkill']['steps'])


def test_a_half_written_checkpoint_is_never_picked_up(interrupted):
  _, seen = interrupted
  run = seen['in_save']
  assert run['rc'] == -signal.SIGKILL
  tmp = [n for n in run['names'] if not n.isdigit()]
  assert len(tmp) == 1 and 'tmp' in tmp[0], run['names']
  half_written = int(tmp[0].split('.')[0])
  assert half_written > max(run['steps'])  # it would be the newest, were it complete
  assert resumed_from(seen['final']['log']) < half_written


def test_an_unreadable_checkpoint_is_reported_and_the_previous_one_used(interrupted):
  workdir, seen = interrupted
  damaged = seen['final']['damaged']
  assert re.search(rf'Checkpoint step {damaged} in \S+ is unreadable .* moved it to '
                   rf'\S+checkpoints.unreadable/{damaged}-', seen['final']['log'])
  (aside,) = os.listdir(os.path.join(workdir, 'checkpoints.unreadable'))
  assert aside.startswith(f'{damaged}-')
  previous = [s for s in seen['in_save']['steps'] if s < damaged]
  assert resumed_from(seen['final']['log']) == max(previous)


def test_an_interrupted_run_ends_bit_identical_to_an_uninterrupted_one(interrupted,
                                                                       uninterrupted):
  (workdir, seen), (reference, results) = interrupted, uninterrupted
  assert seen['final']['rc'] == 0, seen['final']['log'][-3000:]
  assert leaves_equal(checkpoint.load_pretrained(workdir)[0],
                      checkpoint.load_pretrained(reference)[0])
  final = json.load(open(os.path.join(workdir, 'results.json')))
  assert (final['top1'], final['loss']) == (results['top1'], results['loss'])
  assert final['preempted'] is False


########## Divergence: a learning rate of 1e37 from step 5 on.


def diverging(**train_options):
  """10 steps; from step 5 the updates overflow float32: between checkpoints (4, 8) and log
  points (3, 6, 9), at an evaluation (5)."""
  return tiny_config(optim=dict(schedule='step', step_epochs=(0.8,), step_factor=1e38),
                     train=dict(log_every_steps=3, **train_options),
                     checkpoint=dict(every_steps=4, keep=5))


def first_overflowing_step(c) -> int:
  lr = optim.schedule(c.optim, 5, 10)
  return next(count + 1 for count in range(10) if lr(count) > 1e30)


@pytest.fixture(scope='module')
def diverged(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('diverged'))
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(diverging(), workdir)
  return workdir, str(error.value)


def test_divergence_stops_naming_the_step_and_keeps_the_good_checkpoints(diverged):
  workdir, message = diverged
  bad = first_overflowing_step(diverging())
  assert bad == 5
  assert f'Non-finite loss or gradient at step {bad};' in message
  assert 'set train.on_nonfinite=skip' in message
  assert checkpoint.manager(os.path.join(workdir, 'checkpoints')).all_steps() == [4]
  assert checkpoint.manager(os.path.join(workdir, 'best')).all_steps() == []
  assert all(m['step'] < bad for m in metrics(workdir))
  variables, _ = checkpoint.load_pretrained(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def test_divergence_skip_completes_and_counts_the_skipped_steps(diverged, tmp_path):
  workdir = str(tmp_path)
  results = train.train_and_evaluate(diverging(on_nonfinite='skip'), workdir)
  assert results['steps'] == 10 and np.isfinite(results['loss'])
  skipped = sum(m['skipped'] for m in metrics(workdir) if m['split'] == 'train')
  assert skipped == 10 - 5 + 1  # the schedule stays at step 5's learning rate: all skipped
  # Skipped steps leave the state as it was after step 4, bit for bit.
  assert leaves_equal(checkpoint.load_pretrained(workdir)[0],
                      checkpoint.load_pretrained(diverged[0], step=4)[0])


########## Bad input: named, with the fix, before any step is compiled.


@pytest.fixture
def steps_run(monkeypatch):
  """Calls of the train and eval steps; none means an error came before the first compile."""
  calls, build = [], train.parallel_steps

  def counted(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
      calls.append(fn)
      return fn(*args, **kwargs)
    return call

  monkeypatch.setattr(train, 'parallel_steps',
                      lambda *a, **k: tuple(counted(f) for f in build(*a, **k)))
  return calls


@pytest.mark.parametrize('section, key, value, message', [
    ('model', 'name', 'resnet19', r"Unknown model 'resnet19'\. Did you mean resnet18"),
    ('data', 'name', 'digitz', r"Unknown dataset 'digitz'\. Did you mean .*digits"),
])
def test_unknown_model_or_dataset_fails_before_compiling(section, key, value, message,
                                                         tmp_path, steps_run):
  c = tiny_config()
  c[section][key] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(c, str(tmp_path))
  assert steps_run == [] and os.listdir(tmp_path) == []  # nothing claimed or written


def test_labels_outside_the_class_range_fail_before_compiling(monkeypatch, tmp_path, steps_run):
  real = input_pipeline.train_batches

  def with_label_10(*args, **kwargs):
    for batch in real(*args, **kwargs):
      yield {**batch, 'label': np.where(np.arange(len(batch['label'])) == 3, 10,
                                        batch['label'])}

  monkeypatch.setattr(input_pipeline, 'train_batches', with_label_10)
  with pytest.raises(ValueError, match=r'step 1 has labels in \[\d, 10\] but the model has 10 '
                                       r'classes; set model.num_classes'):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert steps_run == []


@pytest.mark.parametrize('shape', [(16, 16, 16), (16, 16, 16, 1)])
def test_images_of_the_wrong_rank_or_channels_fail_while_tracing(shape):
  c = tiny_config()
  s = make_setup(c)
  step, _ = train.parallel_steps(s, c, donate=False)
  batch = {'image': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s.batch_sharding),
           'label': jax.ShapeDtypeStruct((16,), jnp.int32, sharding=s.batch_sharding)}
  # `trace` stops before lowering and compiling: the error comes from the model's check.
  with pytest.raises(ValueError, match=r'ResNet takes NHWC images with 3 channels, got shape '
                                       r'\(\d+, 16, 16(, 1)?\); convert grayscale to RGB'):
    step.trace(train.abstract_state(s), batch)


def test_images_smaller_than_the_model_takes_fail_in_setup():
  c = tiny_config()
  c.model.name, c.model.options = 'alexnet', type(c.model.options)()
  with pytest.raises(ValueError, match=r'AlexNet .* needs images of at least \d+x\d+, got 16x16; '
                                       r'resize the input \(data.image_size\)'):
    make_setup(c)


def test_batch_not_divisible_by_the_devices_fails_before_compiling(tmp_path):
  workdir = str(tmp_path / 'run')
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_arch.main', f'--workdir={workdir}',
       f'--config={config_file(str(tmp_path), "tiny", {})}'],
      cwd=ROOT, capture_output=True, text=True, env=cpu_env(devices=3), timeout=300)
  assert proc.returncode != 0
  assert re.search(r'train.batch_size 16 does not divide over 3 devices on 1 host\(s\); use a '
                   r'multiple of 3 \(e.g. 15\)', proc.stderr), proc.stderr[-3000:]
  assert not os.path.exists(workdir)


def test_a_workdir_of_another_config_is_refused_resumed_or_restarted(tmp_path, steps_run):
  workdir = str(tmp_path)
  old, new = tiny_config(), tiny_config(train=dict(num_epochs=3.0))
  rundir.claim(workdir, old)
  os.makedirs(os.path.join(workdir, 'checkpoints', '10'))
  open(os.path.join(workdir, 'metrics.jsonl'), 'w').close()
  with pytest.raises(ValueError, match=r'holds a run with a different config \(train.num_epochs: '
                                       r'2.0 -> 3.0\)\. Use another --workdir, or '
                                       r'--on_config_change=resume'):
    train.train_and_evaluate(new, workdir)
  assert steps_run == []
  recorded = lambda *p: json.load(open(os.path.join(workdir, *p, 'config.json')))
  assert recorded()['train']['num_epochs'] == 2.0

  rundir.claim(workdir, new, 'resume')  # the checkpoints stay, the old config goes aside
  (aside,) = [n for n in os.listdir(workdir) if n.startswith('previous-')]
  assert recorded()['train']['num_epochs'] == 3.0
  assert recorded(aside)['train']['num_epochs'] == 2.0
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '10'))

  rundir.claim(workdir, old, 'restart')  # the whole run goes aside, nothing is deleted
  (second,) = [n for n in os.listdir(workdir) if n.startswith('previous-') and n != aside]
  assert sorted(os.listdir(os.path.join(workdir, second))) == [
      'checkpoints', 'config.json', 'metrics.jsonl']
  assert os.path.isdir(os.path.join(workdir, second, 'checkpoints', '10'))
  assert sorted(os.listdir(workdir)) == sorted([aside, second, 'config.json'])


########## The workdir: one run at a time, a full disk, paths that cannot be used.


def test_a_second_run_on_a_busy_workdir_refuses_at_once_and_harms_nothing(tmp_path):
  tmp = str(tmp_path)
  workdir = os.path.join(tmp, 'run')
  args = ['-m', 'cnn_arch.main', f'--workdir={workdir}',
          f'--config={config_file(tmp, "long", dict(KILL, train=dict(num_epochs=100.0)))}']
  first = start(args, os.path.join(tmp, 'first.log'))
  wait_until(lambda: steps(os.path.join(workdir, 'checkpoints')), first,
             os.path.join(tmp, 'first.log'))
  config_before = open(os.path.join(workdir, 'config.json')).read()
  second = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True,
                          env=cpu_env(), timeout=300)
  first.send_signal(signal.SIGTERM)
  log = finish(first, os.path.join(tmp, 'first.log'))
  assert second.returncode == 1
  assert second.stderr.strip().splitlines()[-1] == (
      f'cnn_arch.main: error: --workdir={workdir} is in use by another run; wait for it to '
      'finish, or use another --workdir. (--verbose shows the traceback)')
  assert 'Traceback' not in second.stderr
  assert first.returncode == 0 and 'Stopped early by SIGTERM' in log, log[-3000:]
  assert open(os.path.join(workdir, 'config.json')).read() == config_before
  logged = [m['step'] for m in metrics(workdir) if m['split'] == 'train']
  assert logged == sorted(set(logged))  # one writer: no step logged twice
  variables, _ = checkpoint.load_pretrained(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


@pytest.fixture
def tmpfs(tmp_path):
  """Mounts a small tmpfs: `mount(size, read_only=False)` returns its path (needs root)."""
  mounted = []

  def mount(size: str, read_only: bool = False):
    path = tmp_path / f'tmpfs{len(mounted)}'
    path.mkdir()
    options = f'size={size}' + (',ro' if read_only else '')
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
      pytest.skip(f'cannot mount a tmpfs here (needs root): {proc.stderr.strip()}')
    mounted.append(path)
    return path

  yield mount
  for path in mounted:
    subprocess.run(['umount', '-l', str(path)], check=False)


def fill(directory, leave: int = 256 * 1024):
  """Writes a file until the disk is full, then frees `leave` bytes of it."""
  path = os.path.join(directory, 'filler')
  with open(path, 'wb', buffering=0) as f:  # unbuffered: closing it writes nothing more
    try:
      while True:
        f.write(b'\0' * 65536)
    except OSError:
      pass
  os.truncate(path, max(0, os.path.getsize(path) - leave))
  return path


# orbax's writer threads report the ENOSPC again as their event loop closes.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_full_disk_during_a_save_fails_clearly_and_keeps_the_checkpoints(
    tmpfs, monkeypatch, uninterrupted):
  disk = tmpfs('64m')
  workdir = str(disk / 'run')
  real, saves, filler = checkpoint.save_state, [], []

  def filling(mngr, step, *args, **kwargs):
    saves.append(step)
    if len(saves) == 3:  # the disk fills up just before the third save
      filler.append(fill(disk))
    return real(mngr, step, *args, **kwargs)

  monkeypatch.setattr(checkpoint, 'save_state', filling)
  with pytest.raises(OSError, match=r'No space left on the device while saving checkpoint step 6 '
                                    r'in \S+/checkpoints; the checkpoints already there \(steps '
                                    r'\[2, 4\]\) are intact\. Free space'):
    train.train_and_evaluate(tiny_config(**KILL), workdir)
  monkeypatch.undo()
  os.remove(filler[0])
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']  # no partial step
  # The same command resumes from step 4 and ends where an uninterrupted run ends.
  results = train.train_and_evaluate(tiny_config(**KILL), workdir)
  reference, expected = uninterrupted
  assert leaves_equal(checkpoint.load_pretrained(workdir)[0],
                      checkpoint.load_pretrained(reference)[0])
  assert (results['top1'], results['loss']) == (expected['top1'], expected['loss'])


def test_a_workdir_that_cannot_be_used_is_one_line_naming_it(tmp_path, tmpfs):
  afile = tmp_path / 'afile'
  afile.write_text('not a directory')
  cases = [(afile, r'it is a file; choose another --workdir'),
           (afile / 'run', r'\(Not a directory\); choose a directory this user can create'),
           (tmpfs('1m', read_only=True), r'\(not writable\); choose a directory')]
  for path, message in cases:
    with pytest.raises(ValueError, match=rf'^--workdir={re.escape(str(path))} cannot be used.*'
                                         rf'{message}'):
      rundir.make(str(path))
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_arch.main', f'--workdir={afile}',
       f'--config={config_file(str(tmp_path), "tiny", {})}'],
      cwd=ROOT, capture_output=True, text=True, env=cpu_env(), timeout=300)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f'cnn_arch.main: error: --workdir={afile} cannot be used: it is a file; choose another '
      '--workdir or move the file away. (--verbose shows the traceback)')


########## Many hosts: two processes on loopback against one process with two devices.


# The global batch is the whole (20-example) training set, so both runs see the same examples
# at every step: each host reads its own half of the data, one process reads it all. In float64
# (JAX_ENABLE_X64=1), so that the comparison is about semantics: in float32 the two summation
# orders give weights 0.5% of a step apart after three steps of this net, on some CPUs more.
MULTI = dict(model=dict(dtype='float64'), data=dict(per_class=2),
             train=dict(batch_size=20, num_epochs=3.0, eval_every_epochs=100.0),
             checkpoint=dict(every_steps=2, keep_best=False))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_hosts_match_one_host_with_two_devices(tmp_path):
  tmp = str(tmp_path)
  args = ['-m', 'cnn_arch.main', f'--config={config_file(tmp, "multi", MULTI)}']
  port, logs = free_port(), [os.path.join(tmp, f'{n}.log') for n in ('one', 'p0', 'p1')]
  x64 = lambda env: {**env, 'JAX_ENABLE_X64': '1'}
  procs = [start(args + [f'--workdir={tmp}/one'], logs[0], x64(cpu_env(devices=2)))]
  procs += [start(args + [f'--workdir={tmp}/two', f'--coordinator_address=127.0.0.1:{port}',
                          '--num_processes=2', f'--process_id={i}'], logs[1 + i], x64(cpu_env()))
            for i in range(2)]
  for proc, log in zip(procs, logs):
    assert finish(proc, log, timeout=240) and proc.returncode == 0, open(log).read()[-3000:]
  assert 'devices=2' in open(logs[1]).read()
  with jax.enable_x64(True):
    one, two = (checkpoint.load_pretrained(f'{tmp}/{n}')[0] for n in ('one', 'two'))
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    assert flat(one).dtype == np.float64
    one_step = np.linalg.norm(flat(one) - flat(checkpoint.load_pretrained(f'{tmp}/one', 2)[0]))
    # Not bit-identical (each device sums other examples first): float64 rounding apart.
    assert np.linalg.norm(flat(one) - flat(two)) < 1e-9 * one_step
    # One writer: each logged point once, a log every 2 steps and at the last, the final test.
    assert [(m['split'], m['step']) for m in metrics(f'{tmp}/two')] == [
        ('train', 2), ('train', 3), ('eval', 3), ('test', 3)]
    # The two-process checkpoint, optimizer state included, restores in this one-device process.
    c = tiny_config(**MULTI)
    s = make_setup(c)
    state = train.restore_or_init(s, c, checkpoint.manager(f'{tmp}/two/checkpoints'))
    assert int(state.step) == 3
    assert leaves_equal(state.params, two['params'])
