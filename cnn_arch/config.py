"""The configuration schema shared by every `configs/*.py` file, and its real-data variants.

`base()` holds every hyperparameter the trainer reads, with defaults that run on the embedded
offline `digits` dataset; the family config files change what differs, and `variant` applies a
`--config=configs/X.py:VARIANT` preset. `train_setup.make_setup` checks a config against the model
and dataset before anything is compiled, so a bad value costs seconds.
"""

from ml_collections import ConfigDict  # re-exported for configs/*.py
from ml_collections.config_dict import placeholder

DTYPES = ('float32', 'bfloat16')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base() -> ConfigDict:
  """The defaults of every section: model, data, optim, train, finetune, checkpoint."""
  c = ConfigDict()
  c.seed = 0

  c.model = ConfigDict()
  c.model.name = 'resnet18'
  c.model.num_classes = 0  # 0: the dataset's class count (after a class subset).
  c.model.dtype = 'float32'  # 'bfloat16': bf16 compute, float32 parameters and optimizer.
  c.model.options = ConfigDict()  # Passed to models.get_model (norm, width, cifar_stem, ...).

  c.data = ConfigDict()
  c.data.name = 'digits'
  c.data.data_dir = placeholder(str)
  c.data.folder = placeholder(str)
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
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
  c.finetune.freeze_depth = 0  # Freeze the first k stages; the largest k trains only the head.
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
    if c.model.name == 'alexnet':  # torchvision's AlexNet is the one-weird-trick layout
      c.model.name = 'alexnet_tv'
    if c.model.name == 'googlenet':  # its ImageNet weights re-normalise their input
      c.model.options.transform_input = True
    c.finetune.init_from = pretrained_dir
    c.optim.learning_rate = 0.01
    c.optim.warmup_epochs = 0.5
    c.train.num_epochs = 10.0
  else:
    c.model.options.cifar_stem = True
    c.optim.learning_rate = 0.1
    c.train.num_epochs = 200.0
  return c
