"""Frozen-prefix feature caching: the cached run is the uncached run, and its preconditions."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from cnn_arch import checkpoint, feature_cache, models
from cnn_arch import train
from cnn_arch.train_setup import make_setup
from tests.test_train import tiny_config


def forward(model, variables, x, **kwargs):
  """model.apply in inference mode, compiled without backend optimisations (seconds, not tens)."""
  f = jax.jit(functools.partial(model.apply, train=False, **kwargs))
  return f.lower(variables, x).compile(
      compiler_options={'xla_backend_optimization_level': 0})(variables, x)


@pytest.mark.parametrize('name, options, size', [
    ('resnet18', dict(width=0.125, cifar_stem=True), 16),
    ('vgg11_bn', dict(width=0.125, cifar_stem=True), 32),
    ('alexnet', dict(width=0.125, cifar_stem=True), 32),
    ('googlenet', dict(width=0.125, cifar_stem=True, aux_logits=True, transform_input=True), 16),
])
def test_starting_from_a_stage_output_gives_the_same_logits(name, options, size):
  model = models.get_model(name, num_classes=7, **options)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
  variables = models.init_variables(model, size, jax.random.PRNGKey(1))
  logits, feats = forward(model, variables, x, features=True)
  body = model.stage_names[:-1]
  for k in range(1, len(body) + 1):
    out = forward(model, variables, feats[body[k - 1]], start=k)
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5, err_msg=f'start={k}')
  with pytest.raises(ValueError, match='start=9 is out of range'):
    model.apply(variables, x, train=False, start=9)


def run(tmp_path, name, **finetune):
  c = tiny_config(finetune=dict(freeze_depth=3, **finetune))
  workdir = str(tmp_path / name)
  results = train.train_and_evaluate(c, workdir)
  variables, _ = checkpoint.load_pretrained(workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return results, variables, lines


def test_cached_run_takes_the_uncached_run_steps(tmp_path):
  cached, v_cached, lines = run(tmp_path, 'cached', cache_features='on')
  plain, v_plain, _ = run(tmp_path, 'plain', cache_features='off')
  assert cached['cached_stages'] == 3 and plain['cached_stages'] == 0
  assert [l for l in lines if l['split'] == 'feature_cache'][0]['stages'] == 3
  # Same batches, same dropout and BatchNorm statistics: the same weights to float32 rounding,
  # and the frozen stages bit for bit.
  for a, b in zip(jax.tree.leaves(v_cached), jax.tree.leaves(v_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for key in ('stem', 'stage1', 'stage2'):
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v_cached['params'][key]),
                                                     jax.tree.leaves(v_plain['params'][key])))
  assert cached['top1'] == pytest.approx(plain['top1'], abs=1 / cached_eval_count())
  assert cached['loss'] == pytest.approx(plain['loss'], rel=1e-3)


def cached_eval_count() -> int:
  return make_setup(tiny_config()).info.num_eval


def test_auto_caches_only_when_it_can():
  assert make_setup(tiny_config(finetune=dict(freeze_depth=2))).cache_stages == 2
  assert make_setup(tiny_config(finetune=dict(freeze_depth=0))).cache_stages == 0
  augmented = tiny_config(finetune=dict(freeze_depth=2))
  augmented.data.augment = True
  assert make_setup(augmented).cache_stages == 0
  small = tiny_config(finetune=dict(freeze_depth=2, cache_max_mb=0))
  assert make_setup(small).cache_stages == 0
  assert make_setup(tiny_config(finetune=dict(freeze_depth=2,
                                              cache_features='off'))).cache_stages == 0


def test_cache_size_is_the_stage_output_times_the_examples():
  s = make_setup(tiny_config(finetune=dict(freeze_depth=5)))
  # ResNet-18 at 1/8 width: stage4 of a 16x16 input is 2x2x64 float32 = 1 KiB per example.
  assert feature_cache.example_bytes(s.model, 'stage4', 16) == 2 * 2 * 64 * 4
  assert s.cache_bytes == 1024 * (s.info.num_train + s.info.num_eval)


@pytest.mark.parametrize('change, message', [
    (dict(finetune=dict(freeze_depth=0)), 'no stage is frozen'),
    (dict(data=dict(augment=True)), 'set data.augment=False'),
    (dict(finetune=dict(cache_max_mb=0)), 'over finetune.cache_max_mb=0'),
    (dict(finetune=dict(cache_features='yes')), "must be one of 'auto', 'on', 'off'"),
])
def test_impossible_cache_request_fails_before_compiling(change, message):
  c = tiny_config(finetune=dict(freeze_depth=2, cache_features='on'))
  for section, values in change.items():
    c[section].update(values)
  with pytest.raises(ValueError, match=message):
    make_setup(c)
