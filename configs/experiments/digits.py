"""The experiments on real MNIST (embedded, offline), sized for a 2-core CPU.

    python -m experiments.run_all --out=results/     # every experiment, then report.md
    python -m experiments.run_all --out=results_full/ --preset=full

Transfer follows the class split of Yosinski et al. (2014): an eighth-width ResNet-18 (CIFAR
stem, 16x16 inputs) is pretrained on MNIST digits 0-4 (source, ~27,500 training images) and
fine-tuned on digits 5-9 (target) with 5 or 100 training examples per class (`full`: 5, 20,
100, 1,000). Surgical fine-tuning (Lee et al. 2023) pretrains on all ten MNIST digits and
fine-tunes on UCI optdigits (the same ten labels, 8x8 scans of other writers). Runs are selected
on the validation split (carved from MNIST's training set; the default preset uses its first
2,000 images) and reported on MNIST's test split (4,861 images of 5-9). Every seed draws its own
target subset, head initialisation and data order; the arms of one seed share them, so
differences between arms are paired. Scratch vs pretrained also starts from FractalDB
(formula-driven images, `cnn_arch.fractaldb`). The arms of the freeze sweep, surgical
fine-tuning and scratch vs pretrained select their learning rate on validation (`tune`: seed 0
at 0.25x, 1x and 4x the configured 0.05; the transfer arms too under `full`). Every fine-tuning
run of one sweep trains the same number of steps at batch 25, so its programs are compiled once
(the learning rate is a value of the optimizer state, not of the program). OUT/timings.json
records the wall time of each experiment (its tasks summed) and source network, OUT/config.json
the config (the report names its preset). Each section drives one module of `experiments/`; the
real-scale configs next to this file (cifar10_freeze.py, cifar100_to_cifar10.py,
cifar10_scratch.py) have the same structure.
"""

from cnn_arch import config

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
# Runs are selected on the first 2,000 of MNIST's 5,999 validation images (a stratified random
# tenth of the training file, kept in file order): 1,009 of them are the target's digits 5-9,
# whose sampling error (about 1 point) is below the spread between seeds. The final numbers use
# the whole test split; the full preset selects on the whole validation split.
VALIDATION = 'validation[:2000]'


def trainer(classes) -> config.ConfigDict:
  """The trainer config every run starts from (model, data view, optimizer, batch)."""
  c = config.base()
  c.model.name = 'resnet18'
  c.model.options = config.ConfigDict(dict(norm='batch', width=0.125, cifar_stem=True))
  c.data.name = 'mnist_offline'
  c.data.image_size = 16
  c.data.classes = classes
  c.data.eval_split = VALIDATION
  c.train.batch_size = 25  # the smallest target view (5 per class x 5 classes) is one batch
  c.train.eval_batch_size = 500
  c.optim.learning_rate = 0.05
  c.optim.warmup_epochs = 0.0
  c.checkpoint.keep_best = False
  c.checkpoint.every_steps = 10_000  # only the last step is saved
  return c


PRESETS = ('default', 'full')


def source_trainer(classes, epochs: float) -> config.ConfigDict:
  """A source-task trainer: batch 100, where a step costs little more than at 25 on a CPU."""
  c = trainer(classes)
  c.train.batch_size = 100
  c.train.num_epochs = epochs
  c.optim.learning_rate = 0.1
  return c


def get_config(arg=None):
  """`arg`: the preset, 'default' (sized for 15 minutes of a 2-core CPU) or 'full'."""
  preset = arg or 'default'
  if preset not in PRESETS:
    raise ValueError(f'Unknown experiments preset {preset!r}; choose one of {PRESETS}, as in '
                     '--preset=full.')
  c = config.ConfigDict()
  c.name = 'digits'
  c.preset = preset
  c.source = source_trainer(SOURCE_CLASSES, 1.0)  # 275 steps over the ~27,500 images of 0-4
  c.init_from = ''  # '' : pretrain `source`; else a checkpoint directory (e.g. torchvision's)
  c.target = trainer(TARGET_CLASSES)
  # A second source for scratch_vs_pretrained: FractalDB (10 formula-driven classes of 480
  # training images, `cnn_arch.fractaldb`) at the target's input size: 288 steps, 6 epochs.
  c.fractaldb = source_trainer(None, 6.0)
  c.fractaldb.data.name = 'fractaldb'
  c.fractaldb.data.eval_split = 'validation'  # all 600

  # The arms of `experiments` (a freeze depth, a surgical arm, an init) select their learning
  # rate on validation: an arm's first `seeds` seeds run at each of `factors` times the
  # configured rate, the rest at the best (`common.run_tuned`). A grid for the transfer arms
  # would add ~30 s to a default run near its 15 minutes: they share the configured rate
  # (as in Yosinski et al.), and `full` tunes them too.
  c.tune = config.ConfigDict()
  c.tune.factors = (0.25, 1.0, 4.0)
  c.tune.seeds = 1
  c.tune.experiments = ('freeze_sweep', 'surgical', 'scratch_vs_pretrained')

  c.freeze = config.ConfigDict()
  c.freeze.per_class = (5, 100)
  c.freeze.depths = ()  # (): every depth from 0 (tune all) to the head alone
  c.freeze.seeds = (0, 1, 2, 3, 4)  # each seed also draws a different N-per-class subset
  c.freeze.steps = 70

  c.scratch = config.ConfigDict()
  c.scratch.per_class = (20,)  # 0 would be the whole target training set
  c.scratch.norms = ('batch', 'group')
  c.scratch.schedules = (1, 4)  # multiples of steps_1x (He et al. 2019: 1x, 2x, ...)
  c.scratch.steps_1x = 40
  c.scratch.seeds = (0, 1, 2, 3, 4)
  c.scratch.num_evals = 1  # per 1x: a 4x run evaluates 4 times
  c.scratch.fractaldb_norms = ('batch',)  # the norms that also fine-tune from FractalDB

  c.transfer = config.ConfigDict()  # Yosinski et al.'s base B / BnB / AnB / AnB+
  c.transfer.per_class = 100
  c.transfer.depths = (1, 2, 3, 4)  # stages copied (of the five before the head)
  c.transfer.seeds = (0, 1, 2, 3, 4)
  c.transfer.steps = 70

  c.features = config.ConfigDict()
  c.features.seeds = (0, 1, 2, 3, 4)  # each draws its own labelled keys (data.subset_seed)
  c.features.per_class = 100  # the labelled images k-NN and the probe see, per seed
  c.features.k = 5
  c.features.queries = 6  # test images shown in the nearest-neighbour grid (first seed)
  # Linear probe: mean cross-entropy + probe_l2 / 2 * ||W||^2 on standardised features, solved
  # by L-BFGS-B until every gradient component is below probe_tol (or probe_max_iter).
  c.features.probe_l2 = 1e-3
  c.features.probe_max_iter = 2000
  c.features.probe_tol = 1e-5

  c.surgical = config.ConfigDict()  # Lee et al. (2023): tune one block, freeze the rest
  c.surgical.source = source_trainer(None, 0.5)  # all ten digits, 270 steps
  c.surgical.target = trainer(None)
  c.surgical.target.data.name = 'optdigits'
  c.surgical.target.data.eval_split = 'validation'  # all 384
  c.surgical.per_class = 20
  c.surgical.arms = ('block 1', 'stage2', 'stage3', 'stage4', 'head', 'all')
  c.surgical.seeds = (0, 1, 2, 3, 4)
  c.surgical.steps = 70

  c.arch = config.ConfigDict()
  c.arch.data = trainer(None).data  # all ten digits, 200 training images of each
  c.arch.data.per_class = 200
  c.arch.width = 0.125
  c.arch.image_size = 16
  c.arch.batch_size = 32
  c.arch.steps = 640  # 10.3 epochs; evaluated at 3/4 and at the end: how close to its plateau
  c.arch.timed_rounds = 3  # each round: one warm-up and one timed call of every step
  c.arch.seed = 0
  c.arch.models = (
      # lr: validation top-1 after 640 steps was 0.951, 0.969 and 0.963 at 0.05 (the shared
      # lr), 0.02 and 0.01.
      ('alexnet', 'alexnet_tv', dict(norm='batch', lr=0.02)),
      # Five 2x2 pools need 32x32 inputs. lr: validation top-1 after 320 steps was 0.74, 0.85,
      # 0.87, 0.43 and 0.10 at 0.003, 0.01, 0.02, 0.05 (the shared lr) and 0.2.
      ('vgg', 'vgg11_bn', dict(image_size=32, lr=0.02)),
      ('googlenet', 'googlenet', {}),
      ('resnet', 'resnet18', {}),
      ('resnet+GN', 'resnet18', dict(norm='group')),
      # Full width for the lecture's ResNeXt claim (32 groups of 4 channels, as in the paper):
      # timed only (at batch 8); training them is beyond a CPU's budget.
      ('resnet', 'resnet50', dict(width=1.0, batch_size=8, train=False)),
      ('resnext', 'resnext50_32x4d', dict(width=1.0, batch_size=8, train=False)),
  )
  # More target sizes, seeds and schedules: 312,000 fine-tuning steps in the freeze sweep and
  # scratch runs alone, hours on a 2-core CPU at 20-50 ms a step (not timed).
  if preset == 'full':
    seeds = tuple(range(10))
    c.freeze.per_class, c.freeze.seeds, c.freeze.steps = (5, 20, 100, 1000), seeds, 300
    c.transfer.seeds = c.surgical.seeds = c.features.seeds = seeds
    # He et al.'s large-target end: 1,000/class, schedules up to 8x of 2 epochs at that size.
    c.scratch.per_class, c.scratch.schedules, c.scratch.steps_1x = (20, 1000), (1, 2, 4, 8), 400
    c.scratch.seeds = seeds[:5]
    c.scratch.fractaldb_norms = c.scratch.norms
    c.tune.experiments += ('transfer_arms',)
    for section in (c.source, c.target, c.fractaldb, c.surgical.source, c.arch):
      section.data.eval_split = 'validation'
  return c
