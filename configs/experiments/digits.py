"""The four experiments on the embedded offline digits dataset, sized for a 2-core CPU.

    python -m experiments.run_all --out=results/     # all four, then report.md

Most of the run time is XLA compilation; OUT/timings.json records each experiment's wall time
(the committed figures: docs/performance.md).

Transfer follows the class split of Yosinski et al. (2014): an eighth-width ResNet-18 (CIFAR
stem, 16x16 inputs; the digits are 8x8) is pretrained on digits 0-4 (source) and fine-tuned on
digits 5-9 (target). Every fine-tuning run trains a fixed number of
steps at batch 25, so target sizes differ in data, not in compute, and share compiled programs.
Each section drives one module of `experiments/`; the real-scale configs next to this file
(cifar10_freeze.py, cifar100_to_cifar10.py, cifar10_scratch.py) have the same structure.
"""

from cnn_arch import config

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)


def trainer(classes) -> config.ConfigDict:
  """The trainer config every run starts from (model, data view, optimizer, batch)."""
  c = config.base()
  c.model.name = 'resnet18'
  c.model.options = config.ConfigDict(dict(norm='batch', width=0.125, cifar_stem=True))
  c.data.image_size = 16
  c.data.classes = classes
  c.train.batch_size = 25  # the smallest target view (5 per class x 5 classes) is one batch
  c.train.eval_batch_size = 200  # the 179 target test images in one padded batch
  c.optim.learning_rate = 0.05
  c.optim.warmup_epochs = 0.0
  c.checkpoint.keep_best = False
  c.checkpoint.every_steps = 10_000  # only the last step is saved
  return c


def get_config(arg=None):
  del arg
  c = config.ConfigDict()
  c.name = 'digits'
  c.source = trainer(SOURCE_CLASSES)  # pretrained once per norm with train_and_evaluate
  c.source.train.num_epochs = 6.0
  c.source.optim.learning_rate = 0.1
  c.init_from = ''  # '' : pretrain `source`; else a checkpoint directory (e.g. torchvision's)
  c.target = trainer(TARGET_CLASSES)

  c.freeze = config.ConfigDict()
  c.freeze.per_class = (5, 20, 100)  # ~125 is all the target data there is
  c.freeze.depths = ()  # (): every depth from 0 (tune all) to the head alone
  c.freeze.seeds = (0, 1, 2)  # each seed also draws a different N-per-class subset
  c.freeze.steps = 50

  c.scratch = config.ConfigDict()
  c.scratch.per_class = (20, 0)  # 0: the whole target training set
  c.scratch.norms = ('batch', 'group')
  c.scratch.schedules = (1, 2, 4)  # multiples of steps_1x (He et al. 2019: 1x, 2x, ...)
  c.scratch.steps_1x = 30
  c.scratch.seeds = (0,)
  c.scratch.num_evals = 4

  c.features = config.ConfigDict()
  c.features.k = 5
  c.features.queries = 6  # test images shown in the nearest-neighbour grid
  c.features.probe_steps = 300
  c.features.probe_lr = 0.01
  c.features.seed = 0

  c.arch = config.ConfigDict()
  c.arch.data = trainer(None).data  # all ten digits
  c.arch.width = 0.125
  c.arch.image_size = 16
  c.arch.batch_size = 32
  c.arch.steps = 30
  c.arch.timed_steps = 3
  c.arch.seed = 0
  c.arch.models = (
      ('alexnet', 'alexnet_tv', dict(norm='batch')),
      ('vgg', 'vgg11_bn', dict(image_size=32)),  # five 2x2 pools need 32x32 inputs
      ('googlenet', 'googlenet', {}),
      ('resnet', 'resnet18', {}),
      # Full width for the lecture's ResNeXt claim: 32 groups of 4 channels, as in the paper.
      ('resnet', 'resnet50', dict(width=1.0)),
      ('resnext', 'resnext50_32x4d', dict(width=1.0)),
      ('resnet+GN', 'resnet18', dict(norm='group')),
  )
  return c
