"""Checkpoints: the committed one, in the layout of orbax's legacy `item_names` CheckpointManager
API (orbax-checkpoint 0.12.8), still restores whole with the `handler_registry` API.

tests/fixtures/legacy_run/checkpoints is step 2 of the run `legacy_config()` describes;
variables.npz holds its variables, read back when it was written.
"""

import os
import shutil

import jax
import numpy as np
from ml_collections import ConfigDict

from cnn_arch import checkpoint, config as config_lib, train
from cnn_arch.train_setup import make_setup

LEGACY = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'legacy_run')


def legacy_config() -> ConfigDict:
  c = config_lib.base()
  c.model.options = ConfigDict(dict(width=0.0625, cifar_stem=True))
  c.data.image_size, c.data.per_class, c.data.augment = 16, 2, False
  c.train.batch_size, c.train.eval_batch_size, c.train.num_epochs = 20, 64, 2.0
  c.optim.warmup_epochs = 0.0
  c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.keep_best = 1, 1, False
  return c


def expected_variables() -> dict:
  with np.load(os.path.join(LEGACY, 'variables.npz')) as npz:
    return dict(npz)


def flat(tree) -> dict:
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_a_legacy_checkpoint_loads_for_fine_tuning():
  variables, meta = checkpoint.load_pretrained(LEGACY)
  assert meta == {'model': 'resnet18', 'options': {'cifar_stem': True, 'width': 0.0625},
                  'num_classes': 10, 'step': 2, 'data_position': 2}
  got, want = flat(variables), expected_variables()
  assert sorted(got) == sorted(want)
  assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_legacy_checkpoint_resumes_with_its_optimizer_state(tmp_path):
  c = legacy_config()
  s = make_setup(c)
  # A copy: a restore that failed would move the step aside (`checkpoint.restore_latest`).
  shutil.copytree(os.path.join(LEGACY, 'checkpoints'), tmp_path / 'checkpoints')
  mngr = checkpoint.manager(str(tmp_path / 'checkpoints'), keep=1)
  state = train.restore_or_init(s, c, mngr)
  assert int(state.step) == 2
  got, want = flat({'params': state.params, 'batch_stats': state.batch_stats}), expected_variables()
  assert all(np.array_equal(got[k], want[k]) for k in want)
  # SGD momentum: one buffer per trainable leaf, non-zero after two steps.
  momenta = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
             if x.dtype == np.float32 and 'hyperparams' not in jax.tree_util.keystr(p)]
  assert sum(x.size for x in momenta) == sum(x.size for x in jax.tree.leaves(state.params))
  assert any(np.abs(x).max() > 0 for x in momenta)
