"""The config schema: every shipped config is valid, and every bad value is refused up front.

Each bad value must fail in `train.train_and_evaluate` with a message naming the key, the value
and the valid range, before XLA compiles anything and before the workdir is created.
"""

import importlib.util
import os
import re

import jax
import pytest

from cnn_arch import config as config_lib, train
from tests.test_train import ROOT, tiny_config

CONFIG_FILES = sorted(
    os.path.join(d, f) for d in ('configs', 'configs/experiments')
    for f in os.listdir(os.path.join(ROOT, d)) if f.endswith('.py'))


def load(path: str):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3],
                                                os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_every_shipped_config_and_variant_is_valid(path):
  module = load(path)
  if path.count('/') == 1:  # a training config and its variants
    for variant in config_lib.VARIANTS:
      config_lib.validate(module.get_config(variant))
  else:  # an experiment: the training configs of its source and target runs, every preset
    for preset in getattr(module, 'PRESETS', (None,)):
      c = module.get_config(preset)
      for run in (c.source, c.target, c.surgical.source, c.surgical.target):
        config_lib.validate(run)


def test_every_rule_names_a_key_of_the_schema():
  base = config_lib.base()
  for key in config_lib.RULES:
    if not key.startswith('model.options.'):  # options exist per model family
      assert config_lib._lookup(base, key) is not config_lib._MISSING, key


# (key, bad value, the valid range the message must state)
BAD = [
    ('seed', -1, 'an integer >= 0'),
    ('model.num_classes', -3, 'an integer >= 0'),
    ('model.dtype', 'float16', "one of 'float32', 'bfloat16', 'float64'"),
    ('model.options.width', 0.0, r'a finite number in \(0, 16\]'),
    ('model.options.width', float('nan'), r'a finite number in \(0, 16\]'),
    ('model.options.norm', 'layer', "one of 'batch', 'group', 'none'"),
    ('data.name', '', 'a string, not empty'),
    ('data.eval_split', '', 'a string, not empty'),
    ('data.image_size', -4, r'an integer in \[1, 4096\] or None'),
    ('data.image_size', 100_000, r'an integer in \[1, 4096\] or None'),
    ('data.std', (0.3, 0.0, 0.3), 'a tuple of 1 or 3 finite numbers > 0'),
    ('data.mean', (0.1, 0.2), 'a tuple of 1 or 3 finite numbers'),
    ('data.classes', 5, r"a tuple of at least 2 label ids >= 0.*data.classes='\(5,6,7,8,9\)'"),
    ('data.classes', (5,), 'None or a tuple of at least 2 label ids >= 0'),
    ('data.classes', (), 'None or a tuple of at least 2 label ids >= 0'),
    ('data.classes', (1, -2), 'None or a tuple of at least 2 label ids >= 0'),
    ('data.per_class', 0, 'an integer >= 1 or None'),
    ('data.fraction', 0.0, r'a finite number in \(0, 1\] or None'),
    ('data.fraction', 1.5, r'a finite number in \(0, 1\] or None'),
    ('data.shuffle_buffer', 0, 'an integer >= 1'),
    ('optim.name', 'adam', "one of 'sgd', 'adamw'"),
    ('optim.learning_rate', 0.0, r'a finite number in \(0, inf\)'),
    ('optim.learning_rate', float('nan'), r'a finite number in \(0, inf\)'),
    ('optim.learning_rate', float('inf'), r'a finite number in \(0, inf\)'),
    ('optim.momentum', 1.5, r'a finite number in \[0, 1\)'),
    ('optim.momentum', -0.1, r'a finite number in \[0, 1\)'),
    ('optim.b2', 1.0, r'a finite number in \[0, 1\)'),
    ('optim.weight_decay', -1.0, r'a finite number in \[0, inf\)'),
    ('optim.schedule', 'linear', "one of 'cosine', 'step', 'constant'"),
    ('optim.warmup_epochs', -1.0, r'a finite number in \[0, inf\)'),
    ('optim.step_epochs', (60, 30), 'a tuple of epochs >= 0 in increasing order'),
    ('optim.step_factor', 0.0, r'a finite number in \(0, inf\)'),
    ('optim.label_smoothing', 2.0, r'a finite number in \[0, 1\)'),
    ('optim.aux_loss_weight', -0.3, r'a finite number in \[0, inf\)'),
    ('optim.backbone_lr_mult', -1.0, r'a finite number in \[0, inf\)'),
    ('optim.grad_clip', -1.0, r'a finite number >= 0 \(0: off\)'),
    ('train.batch_size', 0, 'an integer >= 1'),
    ('train.eval_batch_size', -8, 'an integer >= 1'),
    ('train.num_epochs', 0.0, r'a finite number in \(0, inf\)'),
    ('train.num_epochs', -1.0, r'a finite number in \(0, inf\)'),
    ('train.log_every_steps', 0, 'an integer >= 1'),
    ('train.eval_every_epochs', 0.0, r'a finite number in \(0, inf\)'),
    ('train.on_nonfinite', 'stopp', "one of 'stop', 'skip'"),
    ('finetune.freeze_depth', -1, 'an integer >= 0'),
    ('finetune.cache_features', 'yes', "one of 'auto', 'on', 'off'"),
    ('finetune.cache_max_mb', -1.0, r'a finite number in \[0, inf\)'),
    ('checkpoint.every_steps', 0, 'an integer >= 1'),
    ('checkpoint.keep', 0, 'an integer >= 1'),
]


def _set(c, key: str, value):
  *parents, leaf = key.split('.')
  for part in parents:
    c = c[part]
  # Bypass the ConfigDict's type check, as a config file or a command-line override can.
  with c.ignore_type():
    c[leaf] = value


@pytest.fixture
def compiles():
  """Backend compilations made while the test runs."""
  seen = []
  listener = lambda event, duration, **kwargs: seen.append(event) if (
      event == '/jax/core/compile/backend_compile_duration') else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield seen
  jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize('key, value, valid', BAD, ids=[f'{k}={v!r}' for k, v, _ in BAD])
def test_a_bad_value_is_refused_before_compiling_or_writing(key, value, valid, tmp_path,
                                                            compiles):
  c = tiny_config()
  _set(c, key, value)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(c, str(workdir))
  message = str(error.value)
  assert message.startswith(f'Config value {key}={value!r} is out of range: it must be ')
  assert re.search(valid, message), message
  assert f'Fix: pass --config.{key}=VALUE' in message
  assert compiles == [] and not workdir.exists()


@pytest.mark.parametrize('changes, message', [
    (dict(optim=dict(warmup_epochs=3.0)), 'optim.warmup_epochs=3.0 is longer than '
                                          'train.num_epochs=2.0'),
    (dict(data=dict(per_class=2, fraction=0.5)), 'data.per_class and data.fraction are both set'),
])
def test_values_that_contradict_each_other_are_refused(changes, message, tmp_path, compiles):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(**changes), str(tmp_path / 'run'))
  assert compiles == [] and not (tmp_path / 'run').exists()


def test_float64_without_x64_names_the_fix():
  c = tiny_config()
  c.model.dtype = 'float64'
  with pytest.raises(ValueError, match='set JAX_ENABLE_X64=1'):
    train.make_setup(c)


def test_finetune_variants_take_the_family_quirks_of_torchvision_weights():
  # torchvision's AlexNet weights are the one-weird-trick layout; its GoogLeNet weights expect
  # their input re-normalised (transform_input).
  assert load('configs/alexnet.py').get_config('cifar10_finetune').model.name == 'alexnet_tv'
  assert load('configs/alexnet.py').get_config('cifar10').model.name == 'alexnet'
  googlenet = load('configs/googlenet.py')
  assert googlenet.get_config('cifar10_finetune').model.options.transform_input
  assert 'transform_input' not in googlenet.get_config('cifar10').model.options
