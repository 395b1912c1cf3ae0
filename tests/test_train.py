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
  n_state = sum(x.size for x in jax.tree.leaves(after.opt_state) if x.dtype == np.float32)
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
  assert {l['split'] for l in lines} == {'train', 'eval'}
  assert all(np.isfinite(l['loss']) for l in lines)
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert os.path.exists(os.path.join(workdir, 'results.md'))
  assert 5 in checkpoint.manager(os.path.join(workdir, 'checkpoints')).all_steps()


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


FOUR_DEVICES = r'''
import sys, jax, numpy as np
sys.path.insert(0, sys.argv[1])
from tests.test_train import tiny_config, run_steps
assert jax.device_count() == int(sys.argv[2])
_, before, after = run_steps(tiny_config(), 1)
leaves = lambda s: jax.tree.leaves((s.params, s.batch_stats))
np.savez(sys.argv[3], before=np.array(leaves(before), object), after=np.array(leaves(after), object))
'''


def test_one_and_four_devices_reach_the_same_parameters(tmp_path):
  out = {}
  for n in (1, 4):
    env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
    subprocess.run([sys.executable, '-c', FOUR_DEVICES, ROOT, str(n), str(tmp_path / f'{n}.npz')],
                   check=True, env=env, cwd=ROOT)
    out[n] = np.load(tmp_path / f'{n}.npz', allow_pickle=True)
  for start, one, four in zip(out[1]['before'], out[1]['after'], out[4]['after']):
    # Equal up to float summation order: well under 1% of what the step changed.
    moved = np.abs(one - start).max()
    assert np.abs(one - four).max() <= 1e-2 * moved + 1e-6
def test_unknown_config_key_is_named(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'cnn_arch.main', '--config=configs/resnet.py',
       f'--workdir={tmp_path}', '--config.train.numepochs=3'],
      cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode != 0
  assert 'numepochs' in proc.stderr
