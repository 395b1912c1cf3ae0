"""Training and fine-tuning: what a run writes, freezing invariants, fine-tuning, resume, errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from cnn_arch import checkpoint, config as config_lib, freeze, train
from cnn_arch.train_setup import make_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**sections) -> ConfigDict:
  """A ResNet-18 at 1/8 width on 16x16 digits, 8 examples per class: seconds per run."""
  c = config_lib.base()
  c.model.options = ConfigDict(dict(width=0.125, cifar_stem=True))
  c.data.image_size = 16
  c.data.per_class = 8
  c.data.augment = False
  c.train.batch_size = 16
  c.train.eval_batch_size = 64
  c.train.num_epochs = 2.0
  c.train.log_every_steps = 2
  c.checkpoint.every_steps = 3
  c.optim.warmup_epochs = 0.0
  for section, values in sections.items():
    c[section].update(values)
  return c


def run_steps(c: ConfigDict, n: int):
  """`n` data-parallel train steps on the real pipeline; returns (setup, initial, final)."""
  s = make_setup(c)
  state = jax.device_put(train.init_state(s, c), s.replicated)
  initial = jax.device_get(state)
  step, _ = train.parallel_steps(s, c, donate=False)
  batches = train.input_pipeline.train_batches(c.data, global_batch_size=c.train.batch_size,
                                               seed=c.seed)
  for _ in range(n):
    state, _ = step(state, train.to_global(next(batches), s.batch_sharding))
  return s, initial, jax.device_get(state)


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('depth', range(6))
def test_freezing_leaves_frozen_stages_bit_identical(depth):
  c = tiny_config(finetune=dict(freeze_depth=depth), optim=dict(weight_decay=0.1))
  s, before, after = run_steps(c, 3)
  assert s.stage_names == ('stem', 'stage1', 'stage2', 'stage3', 'stage4', 'head')
  for key in s.stage_names:
    same_params = leaves_equal(before.params[key], after.params[key])
    same_stats = leaves_equal(before.batch_stats.get(key, {}), after.batch_stats.get(key, {}))
    if key in s.stage_names[:depth]:
      assert same_params and same_stats, f'{key} moved although frozen'
    else:
      assert not same_params, f'{key} did not train'
      if key in before.batch_stats:
        assert not same_stats, f'{key} batch statistics did not update'
  # Frozen leaves hold no optimizer state: the momentum buffers cover only trainable leaves.
  # (The learning rate is a scalar of the state too, `optim.make`.)
  n_state = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(after.opt_state)[0]
                if x.dtype == np.float32 and 'hyperparams' not in jax.tree_util.keystr(p))
  n_trainable = sum(p.size for key in s.stage_names[depth:]
                    for p in jax.tree.leaves(after.params[key]))
  assert n_state == n_trainable


def test_freeze_depth_out_of_range_fails_before_compiling():
  with pytest.raises(ValueError, match=r'freeze depth 6 is out of range.*0 .* to 5'):
    make_setup(tiny_config(finetune=dict(freeze_depth=6)))


def test_freeze_labels_cover_every_parameter():
  params = {'stem': {'w': 0}, 'stage1': {'w': 0}, 'head': {'w': 0}, 'aux1': {'w': 0}}
  names = ('stem', 'stage1', 'head')
  labels = freeze.labels(params, names, 2, attached={'aux1': 'stage1'})
  assert labels == {'stem': {'w': 'frozen'}, 'stage1': {'w': 'frozen'},
                    'head': {'w': 'head'}, 'aux1': {'w': 'frozen'}}
  with pytest.raises(ValueError, match='belong to no stage'):
    freeze.labels({**params, 'extra': {}}, names, 0, attached={'aux1': 'stage1'})


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A short run on all ten digits: the 'pretrained network' of the fine-tuning tests."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  results = train.train_and_evaluate(tiny_config(train=dict(num_epochs=1.0)), workdir)
  return workdir, results


def test_run_writes_results_metrics_tensorboard_and_checkpoints(pretrained):
  workdir, results = pretrained
  for key in ('top1', 'top5', 'loss', 'steps', 'examples_per_sec', 'trainable_params',
              'frozen_params', 'freeze_depth'):
    assert key in results
  assert json.load(open(os.path.join(workdir, 'results.json')))['steps'] == results['steps'] == 5
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert {l['split'] for l in lines} == {'train', 'eval', 'test'}
  assert all(np.isfinite(l['loss']) for l in lines)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert os.path.exists(os.path.join(workdir, 'results.md'))
  assert 5 in checkpoint.manager(os.path.join(workdir, 'checkpoints')).all_steps()


def test_selection_uses_validation_and_the_test_split_gives_the_final_number(pretrained):
  workdir, results = pretrained
  # digits has a validation split: it is evaluated during training and picks the best
  # checkpoint; the test split is evaluated once, at the end, on the final state.
  assert results['eval_split'] == 'validation' and results['test_split'] == 'test'
  assert results['num_eval'] == 179 and 0 <= results['test_top1'] <= 1
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['step'] for l in lines if l['split'] == 'test'] == [results['steps']]
  c = tiny_config(data=dict(eval_split='test'), train=dict(num_epochs=0.2))
  s = make_setup(c)
  assert s.info.num_eval == 359 and train.datasets.test_split(c.data) is None


def test_finetune_loads_backbone_and_reinitialises_head(pretrained):
  workdir, _ = pretrained
  loaded, meta = checkpoint.load_pretrained(workdir)
  assert meta['num_classes'] == 10
  c = tiny_config(data=dict(classes=(5, 6, 7, 8, 9)),
                  finetune=dict(init_from=workdir, freeze_depth=3))
  s = make_setup(c)
  state = train.init_state(s, c)
  for key in s.stage_names[:-1]:
    assert leaves_equal(state.params[key], loaded['params'][key])
  assert state.params['head']['kernel'].shape[-1] == 5
  assert loaded['params']['head']['kernel'].shape[-1] == 10


def test_init_from_errors(pretrained, tmp_path):
  workdir, _ = pretrained
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    make_and_init(tiny_config(finetune=dict(init_from=str(tmp_path / 'nothing'))))
  with pytest.raises(ValueError, match="holds a 'resnet18' network but model.name is 'resnet34'"):
    c = tiny_config(finetune=dict(init_from=workdir))
    c.model.name = 'resnet34'
    make_and_init(c)
  with pytest.raises(ValueError, match='does not fit model resnet18'):
    c = tiny_config(finetune=dict(init_from=workdir))
    c.model.options.width = 0.25
    make_and_init(c)


def make_and_init(c):
  return train.init_state(make_setup(c), c)


def test_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path):
  c = tiny_config()
  full = train.train_and_evaluate(c, str(tmp_path / 'full'))
  stopped = str(tmp_path / 'stopped')
  train.train_and_evaluate(c, stopped)
  mngr = checkpoint.manager(os.path.join(stopped, 'checkpoints'))
  assert mngr.all_steps() == [9, 10]
  # As if killed after step 9's checkpoint: drop the final one and run the same command again.
  mngr.delete(10)
  resumed = train.train_and_evaluate(c, stopped)
  a, _ = checkpoint.load_pretrained(str(tmp_path / 'full'))
  b, _ = checkpoint.load_pretrained(stopped)
  assert leaves_equal(a, b)
  assert resumed['top1'] == full['top1'] and resumed['loss'] == full['loss']


# One step of the tiny ResNet-18 on a 1-device and on a 4-device mesh, from one float32 initial
# state and batch. argv: dtype, the file of that state (written by the float32 run, read and cast
# by the float64 one), the output file. The float64 run also steps from a copy whose inputs carry
# float32-sized relative noise (2**-24): how much rounding of that size moves the update.
DEVICES = r"""
import dataclasses, sys
import jax, numpy as np
dtype, init_file, out_file = sys.argv[2:5]
jax.config.update('jax_enable_x64', dtype == 'float64')
sys.path.insert(0, sys.argv[1])
from jax.sharding import NamedSharding, PartitionSpec as P
from cnn_arch import train
from cnn_arch.train_setup import AXIS, make_setup
from tests.test_train import tiny_config
assert jax.device_count() == 4
c = tiny_config()
c.model.dtype = dtype
four = make_setup(c)
mesh = jax.make_mesh((1,), (AXIS,), devices=jax.devices()[:1])
one = dataclasses.replace(four, mesh=mesh, batch_sharding=NamedSharding(mesh, P(AXIS)),
                          replicated=NamedSharding(mesh, P()))
batch = next(train.input_pipeline.train_batches(c.data, global_batch_size=16, seed=c.seed))
state = jax.device_get(train.init_state(four, c))
if dtype == 'float32':
  # BatchNorm biases start at 0, so a channel that is constant over the batch (the digits have
  # blank borders) puts ReLU exactly at its kink, where rounding decides the gradient: random
  # biases keep every ReLU input away from 0 and the step a smooth function of its inputs.
  shift = lambda path, x: (x + np.random.default_rng(0).normal(0, 0.1, x.shape).astype(x.dtype)
                           if jax.tree_util.keystr(path).endswith("['bias']") else x)
  state = state.replace(params=jax.tree_util.tree_map_with_path(shift, state.params))
  np.savez(init_file, *jax.tree.leaves(state))
else:
  saved = np.load(init_file)
  state = jax.tree.unflatten(jax.tree.structure(state),
                             [saved[f'arr_{i}'] for i in range(len(saved.files))])
  wide = lambda x: x.astype(np.float64) if x.dtype == np.float32 else x
  state, batch = jax.tree.map(wide, state), jax.tree.map(wide, batch)
noise = lambda x: x * (1 + 2.0**-24 * np.random.default_rng(1).choice([-1, 1], x.shape))
runs = [('one', one, state, batch), ('four', four, state, batch)]
if dtype == 'float64':
  runs.append(('noisy', one, state.replace(params=jax.tree.map(noise, state.params)),
               dict(batch, image=noise(batch['image']))))
out = {'start': jax.tree.leaves((state.params, state.batch_stats))}
for name, s, x, b in runs:
  step, _ = train.parallel_steps(s, c, donate=False)
  new, _ = step(jax.device_put(x, s.replicated), train.to_global(b, s.batch_sharding))
  out[name] = jax.tree.leaves(jax.device_get((new.params, new.batch_stats)))
np.savez(out_file, **{f'{k}/{i}': v for k, vs in out.items() for i, v in enumerate(vs)})
"""


@pytest.fixture(scope='module')
def one_and_four_devices(tmp_path_factory):
  """{dtype: {'start', 'one', 'four'[, 'noisy']: leaves of (params, batch_stats)}}."""
  tmp = tmp_path_factory.mktemp('devices')
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  out = {}
  for dtype in ('float32', 'float64'):  # float32 first: it writes the shared initial state
    subprocess.run([sys.executable, '-c', DEVICES, ROOT, dtype, str(tmp / 'init.npz'),
                    str(tmp / f'{dtype}.npz')], check=True, env=env, cwd=ROOT)
    saved = np.load(tmp / f'{dtype}.npz')
    runs = {}
    for key in saved.files:
      name, i = key.split('/')
      runs.setdefault(name, {})[int(i)] = saved[key]
    out[dtype] = {name: [leaves[i] for i in range(len(leaves))] for name, leaves in runs.items()}
  return out


def relative(a: list, b: list, scale: list) -> float:
  """||a - b|| / ||scale|| over all leaves, in float64."""
  norm = lambda xs: np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in xs))
  return norm([np.asarray(x, np.float64) - y for x, y in zip(a, b)]) / norm(scale)


def test_one_and_four_devices_compute_the_same_step_in_float64(one_and_four_devices):
  # Synchronised BatchNorm and the gradient mean over the batch axis make the step independent
  # of the device count; in float64 rounding leaves ~1e-15 of the update, so 1e-10 of it, on
  # every leaf, is a statement about semantics that holds on any CPU.
  runs = one_and_four_devices['float64']
  for start, one, four in zip(runs['start'], runs['one'], runs['four']):
    assert np.abs(one - four).max() <= 1e-10 * np.abs(one - start).max()


def test_one_and_four_devices_in_float32_are_within_float32_rounding_of_float64(
    one_and_four_devices):
  # The tolerance comes from float64: `noisy` is the step from inputs perturbed by one float32
  # rounding (2**-24), i.e. how much rounding of that size moves the update (measured: 1.2e-6 of
  # it). Float32 rounds again in every layer, forward and backward, but the measured error of
  # each mesh stays about that size (1.0-1.1e-6); 10x leaves room for other CPUs' kernels.
  f32, f64 = one_and_four_devices['float32'], one_and_four_devices['float64']
  update = [b - a for a, b in zip(f64['start'], f64['one'])]
  sensitivity = relative(f64['noisy'], f64['one'], update)
  assert 0 < sensitivity < 1e-5  # a smooth problem (see the bias shift in DEVICES)
  for mesh in ('one', 'four'):
    assert relative(f32[mesh], f64[mesh], update) <= 10 * sensitivity, mesh


def test_unknown_config_key_is_named(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_arch.main', '--config=configs/resnet.py',
       f'--workdir={tmp_path}', '--config.train.numepochs=3'],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0
  assert 'numepochs' in proc.stderr
