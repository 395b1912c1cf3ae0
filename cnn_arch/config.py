"""The configuration schema shared by every `configs/*.py` file, and its real-data variants.

`base()` holds every hyperparameter the trainer reads, with defaults that run on the embedded
offline `digits` dataset; the family config files change what differs, and `variant` applies a
`--config=configs/X.py:VARIANT` preset. `validate` checks every value against `RULES`, the
schema's ranges, and `train_setup.make_setup` checks the config against the model and dataset;
both run before anything is compiled or written, so a bad value costs seconds.
"""

import math
import numbers

from ml_collections import ConfigDict  # re-exported for configs/*.py
from ml_collections.config_dict import placeholder

from cnn_arch.models.common import IMAGENET_MEAN, IMAGENET_STD, NORMS

DTYPES = ('float32', 'bfloat16', 'float64')


def base() -> ConfigDict:
  """The defaults of every section: model, data, optim, train, finetune, checkpoint."""
  c = ConfigDict()
  c.seed = 0

  c.model = ConfigDict()
  c.model.name = 'resnet18'
  c.model.num_classes = 0  # 0: the dataset's class count (after a class subset).
  c.model.dtype = 'float32'  # 'bfloat16': bf16 compute, float32 parameters and optimizer.
  c.model.options = ConfigDict()  # Passed to models.get_model (norm, width, cifar_stem, ...).
  # 0: BatchNorm statistics of the whole global batch (synchronised over devices). g > 0:
  # "ghost" BatchNorm, statistics over groups of g examples on each device (Wu & He 2018's
  # batch-size study).
  c.model.bn_group_size = 0

  c.data = ConfigDict()
  c.data.name = 'digits'
  c.data.data_dir = placeholder(str)
  c.data.folder = placeholder(str)
  c.data.train_split = 'train'
  # None: `validation` where the dataset has one (else `test`). Evaluated during training; the
  # best checkpoint is chosen on it. data.test_split (None: `test`) is evaluated once, at the end.
  c.data.eval_split = placeholder(str)
  c.data.test_split = placeholder(str)
  # None (the placeholders): the dataset's default, e.g. 32x32 for digits and CIFAR, else 224.
  c.data.image_size = placeholder(int)
  c.data.mean = placeholder(tuple)
  c.data.std = placeholder(tuple)
  c.data.augment = True
  # A class subset, relabelled 0..C-1; (5, 6, 7, 8, 9) is the target task of Yosinski et al.
  c.data.classes = placeholder(tuple)
  c.data.per_class = placeholder(int)  # N training examples per class (few-shot).
  c.data.fraction = placeholder(float)  # A fraction of the training set.
  c.data.subset_seed = 0  # Which examples a per_class/fraction view keeps (not the run's seed).
  c.data.manual_dir = placeholder(str)  # tfds manual downloads (imagenet2012).
  c.data.download = True  # False: fail at once instead of trying to download a tfds dataset.
  c.data.cache = True
  c.data.shuffle_buffer = 10_000  # Examples shuffled together (the whole set when smaller).

  c.optim = ConfigDict()
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 1.0
  c.optim.step_epochs = (30, 60, 80)  # Only for schedule='step'.
  c.optim.step_factor = 0.1
  c.optim.label_smoothing = 0.0
  c.optim.aux_loss_weight = 0.3  # GoogLeNet's auxiliary classifiers (Szegedy et al. 2015).
  c.optim.backbone_lr_mult = 1.0  # < 1: unfrozen backbone stages learn slower than the head.
  c.optim.layer_decay = 1.0  # < 1: the i-th stage below the head learns at lr * d**i.
  c.optim.grad_clip = 0.0  # 0: off.

  c.train = ConfigDict()
  c.train.batch_size = 128  # Global: split evenly over all devices of all hosts.
  c.train.eval_batch_size = 256
  c.train.num_epochs = 10.0
  c.train.log_every_steps = 10
  c.train.eval_every_epochs = 1.0
  c.train.on_nonfinite = 'stop'  # 'stop' or 'skip' a step whose loss/gradient is not finite.

  c.finetune = ConfigDict()
  c.finetune.init_from = ''  # A run's workdir or a `cnn_arch.convert` output directory.
  # Which stages train (cnn_arch.finetune): the first freeze_depth stages are frozen (the
  # largest k trains only the head), or exactly train_stages (names) train, or phases.
  c.finetune.freeze_depth = 0
  c.finetune.train_stages = placeholder(tuple)  # e.g. ('stem',): surgical fine-tuning.
  c.finetune.train_head = True
  # ((epochs, stages), ...), stages a freeze depth, names or 'all': e.g. LP-FT is
  # ((2.0, ()), (8.0, 'all')). The lengths add up to train.num_epochs.
  c.finetune.phases = ()
  c.finetune.reinit_above = False  # Stages above the frozen prefix start random (Yosinski's AnB).
  # Copy only the first copy_depth stages from init_from; the rest and the head start random
  # (None: copy all, the head when its class count fits). Freezing none: Yosinski's AnB+.
  c.finetune.copy_depth = placeholder(int)
  c.finetune.head_init_scale = 1.0  # A new head's kernel times this; 0: a zero head.
  # Run the frozen stages once over the data and train on their stored output (needs
  # data.augment=False): 'auto' when it fits in cache_max_mb of host memory, 'on' (else an
  # error), 'off'. See cnn_arch.feature_cache.
  c.finetune.cache_features = 'auto'
  c.finetune.cache_max_mb = 4096

  c.checkpoint = ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 2
  c.checkpoint.keep_best = True  # Also keep the best step by validation top-1 in WORKDIR/best.
  return c


########## The valid range of every value, checked before a run compiles or writes anything.


class Rule:
  """A check of one config value: `ok(value)` and the range in words, for the error message."""

  def __init__(self, ok, valid: str, hint: str = ''):
    self.ok, self.valid, self.hint = ok, valid, hint


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None, optional: bool = False) -> Rule:
  valid = f'an integer >= {lo}' if hi is None else f'an integer in [{lo}, {hi}]'
  return Rule(lambda v: (optional and v is None) or (
      _is_int(v) and lo <= v and (hi is None or v <= hi)), valid + (' or None' if optional else ''))


def real(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
         optional: bool = False) -> Rule:
  """A finite number in the interval; `*_open` excludes that end."""
  left, right = '(' if lo_open else '[', ')' if hi_open or hi is None else ']'
  valid = f'a finite number in {left}{lo}, {"inf" if hi is None else hi}{right}'

  def ok(v):
    if optional and v is None:
      return True
    if not _is_real(v) or v < lo or (lo_open and v == lo):
      return False
    return hi is None or v < hi or (v == hi and not hi_open)
  return Rule(ok, valid + (' or None' if optional else ''))


def choice(*options) -> Rule:
  return Rule(lambda v: v in options, 'one of ' + ', '.join(repr(o) for o in options))


def boolean() -> Rule:
  return Rule(lambda v: isinstance(v, bool), 'True or False')


def text(optional: bool = False, empty: bool = False) -> Rule:
  return Rule(lambda v: (optional and v is None) or (isinstance(v, str) and (empty or v != '')),
              'a string' + ('' if empty else ', not empty') + (' or None' if optional else ''))


def classes() -> Rule:
  return Rule(lambda v: v is None or (
      isinstance(v, (tuple, list)) and len(v) >= 2 and all(_is_int(x) and x >= 0 for x in v)),
      'None or a tuple of at least 2 label ids >= 0',
      hint="a tuple of classes: --config.data.classes='(5,6,7,8,9)'")


def per_channel(positive: bool) -> Rule:
  return Rule(lambda v: v is None or (
      isinstance(v, (tuple, list)) and len(v) in (1, 3)
      and all(_is_real(x) and (x > 0 if positive else True) for x in v)),
      f'None or a tuple of 1 or 3 finite numbers{" > 0" if positive else ""}')


def increasing() -> Rule:
  return Rule(lambda v: isinstance(v, (tuple, list)) and all(_is_real(x) and x >= 0 for x in v)
              and list(v) == sorted(v), 'a tuple of epochs >= 0 in increasing order')


OPTIMIZERS, SCHEDULES = ('sgd', 'adamw'), ('cosine', 'step', 'constant')
ON_NONFINITE, CACHE_FEATURES = ('stop', 'skip'), ('auto', 'on', 'off')
MAX_IMAGE_SIZE = 4096

RULES = {
    'seed': integer(0),
    'model.name': text(),
    'model.num_classes': Rule(integer(0).ok, 'an integer >= 0 (0: the dataset\'s class count)'),
    'model.dtype': choice(*DTYPES),
    'model.bn_group_size': Rule(integer(0).ok, 'an integer >= 0 (0: the global batch)'),
    'model.options.width': real(0, 16, lo_open=True),
    'model.options.norm': choice(*NORMS),
    'model.options.cifar_stem': boolean(),
    'model.options.transform_input': boolean(),
    'data.name': text(),
    'data.data_dir': text(optional=True),
    'data.folder': text(optional=True),
    'data.manual_dir': text(optional=True),
    'data.train_split': text(),
    'data.eval_split': text(optional=True),
    'data.test_split': text(optional=True),
    'data.image_size': integer(1, MAX_IMAGE_SIZE, optional=True),
    'data.mean': per_channel(positive=False),
    'data.std': per_channel(positive=True),
    'data.augment': boolean(),
    'data.classes': classes(),
    'data.per_class': integer(1, optional=True),
    'data.fraction': real(0, 1, lo_open=True, optional=True),
    'data.subset_seed': integer(0),
    'data.download': boolean(),
    'data.cache': boolean(),
    'data.shuffle_buffer': integer(1),
    'optim.name': choice(*OPTIMIZERS),
    'optim.learning_rate': real(0, lo_open=True),
    'optim.momentum': real(0, 1, hi_open=True),
    'optim.nesterov': boolean(),
    'optim.b1': real(0, 1, hi_open=True),
    'optim.b2': real(0, 1, hi_open=True),
    'optim.weight_decay': real(0),
    'optim.schedule': choice(*SCHEDULES),
    'optim.warmup_epochs': real(0),
    'optim.step_epochs': increasing(),
    'optim.step_factor': real(0, lo_open=True),
    'optim.label_smoothing': real(0, 1, hi_open=True),
    'optim.aux_loss_weight': real(0),
    'optim.backbone_lr_mult': real(0),
    'optim.layer_decay': real(0, 1, lo_open=True),
    'optim.grad_clip': Rule(real(0).ok, 'a finite number >= 0 (0: off)'),
    'train.batch_size': integer(1),
    'train.eval_batch_size': integer(1),
    'train.num_epochs': real(0, lo_open=True),
    'train.log_every_steps': integer(1),
    'train.eval_every_epochs': real(0, lo_open=True),
    'train.on_nonfinite': choice(*ON_NONFINITE),
    'finetune.init_from': text(empty=True),
    'finetune.freeze_depth': integer(0),
    'finetune.train_stages': Rule(lambda v: v is None or (
        isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v)),
        'None or a tuple of stage names', hint="a tuple: --config.finetune.train_stages='(\"stem\",)'"),
    'finetune.train_head': boolean(),
    'finetune.phases': Rule(lambda v: isinstance(v, (tuple, list)),
                            'a tuple of (epochs, stages) pairs',
                            hint="a tuple: --config.finetune.phases='((2.0, ()), (8.0, \"all\"))'"),
    'finetune.reinit_above': boolean(),
    'finetune.copy_depth': integer(0, optional=True),
    'finetune.head_init_scale': real(0),
    'finetune.cache_features': choice(*CACHE_FEATURES),
    'finetune.cache_max_mb': real(0),
    'checkpoint.every_steps': integer(1),
    'checkpoint.keep': integer(1),
    'checkpoint.keep_best': boolean(),
}
_MISSING = object()


def _lookup(c: ConfigDict, key: str):
  for part in key.split('.'):
    if not isinstance(c, ConfigDict) or part not in c:
      return _MISSING
    c = c[part]
  return c


def validate(c: ConfigDict) -> None:
  """Raises a ValueError naming the key, its value, the valid range and the fix.

  Every key of `RULES` that the config has is checked (model options only where the model has
  them), plus the ranges that depend on two keys.
  """
  for key, rule in RULES.items():
    value = _lookup(c, key)
    if value is not _MISSING and not rule.ok(value):
      fix = f'pass --config.{key}=VALUE with {rule.hint or "a value in that range"}'
      raise ValueError(f'Config value {key}={value!r} is out of range: it must be {rule.valid}. '
                       f'Fix: {fix}.')
  per_class, fraction = _lookup(c, 'data.per_class'), _lookup(c, 'data.fraction')
  if per_class not in (None, _MISSING) and fraction not in (None, _MISSING):
    raise ValueError('Config values data.per_class and data.fraction are both set: a view takes '
                     'N examples per class or a fraction, not both. Fix: set one of them to None.')
  warmup, epochs = _lookup(c, 'optim.warmup_epochs'), _lookup(c, 'train.num_epochs')
  if _MISSING not in (warmup, epochs) and warmup > epochs:
    raise ValueError(f'Config value optim.warmup_epochs={warmup!r} is longer than '
                     f'train.num_epochs={epochs!r}: the learning rate would never reach its peak. '
                     'Fix: lower optim.warmup_epochs or raise train.num_epochs.')


VARIANTS = ('digits', 'cifar10', 'cifar100', 'cifar10_finetune')


def variant(c: ConfigDict, arg: str | None, pretrained_dir: str) -> ConfigDict:
  """Applies a `--config=configs/X.py:VARIANT` preset on top of a family's defaults.

  digits (default): the embedded offline dataset, small enough for a 2-core CPU.
  cifar10 / cifar100: training from scratch at 32x32 with the CIFAR stem (GPU; tfds downloads
    the data once: run `python -c "import tensorflow_datasets as tfds; tfds.load('cifar10')"`
    with internet, then point data.data_dir at the result).
  cifar10_finetune: CIFAR-10 resized to 224 from torchvision ImageNet weights converted into
    `pretrained_dir` by `python -m cnn_arch.convert` (see README), freeze depth from the
    command line.
  """
  arg = arg or 'digits'
  if arg not in VARIANTS:
    raise ValueError(f'Unknown config variant {arg!r}; choose one of {VARIANTS}.')
  if arg == 'digits':
    return c
  c.data.name = 'cifar100' if arg == 'cifar100' else 'cifar10'
  c.model.options.width = 1.0
  c.train.batch_size = 128
  c.checkpoint.every_steps = 2000
  c.train.log_every_steps = 100
  if arg == 'cifar10_finetune':
    c.data.image_size = 224
    c.data.mean, c.data.std = IMAGENET_MEAN, IMAGENET_STD  # the statistics the weights expect
    c.model.options.cifar_stem = False
    c.finetune.init_from = pretrained_dir
    c.optim.learning_rate = 0.01
    c.optim.warmup_epochs = 0.5
    c.train.num_epochs = 10.0
  else:
    c.model.options.cifar_stem = True
    c.optim.learning_rate = 0.1
    c.train.num_epochs = 200.0
  return c
