"""Freeze-depth sweep CIFAR-100 -> CIFAR-10: pretrain on CIFAR-100, fine-tune on CIFAR-10 (GPU).

    python -m experiments.freeze_sweep --config=configs/experiments/cifar100_to_cifar10.py \
        --out=results/cifar100_to_cifar10
    python -m experiments.report --out=results/cifar100_to_cifar10

A full-width ResNet-18 with the CIFAR stem at 32x32 is trained from scratch on CIFAR-100 (the
source, 60 epochs, through `train.train_and_evaluate`: checkpointed and resumable, in
OUT/pretrain_batch), then fine-tuned on CIFAR-10 at every freeze depth with 10, 100, 1000 and
all 5000 examples per class, three seeds, a fixed 2,000 steps at batch 128. Needs cifar10 and
cifar100 prepared by tfds (`tfds build cifar10 cifar100` once with internet). About an hour of
GPU time for the source, then 72 short runs.
"""

from configs.experiments import digits


def _cifar(c, name: str):
  c.model.options = digits.config.ConfigDict(dict(norm='batch', width=1.0, cifar_stem=True))
  c.data.name = name
  c.data.classes = None
  c.data.eval_split = None  # `validation` where the dataset has one, else `test`
  c.data.image_size = 32
  c.data.download = False
  c.train.batch_size = 128
  c.train.eval_batch_size = 500
  return c


def get_config(arg=None):
  del arg
  c = digits.get_config()
  c.name = 'cifar100_to_cifar10'
  _cifar(c.source, 'cifar100')
  c.source.train.num_epochs = 60.0
  c.source.optim.learning_rate = 0.1
  c.source.optim.warmup_epochs = 1.0
  c.source.checkpoint.every_steps = 2000
  c.init_from = ''  # pretrain `source`
  _cifar(c.target, 'cifar10')
  c.target.optim.learning_rate = 0.02
  c.freeze.per_class = (10, 100, 1000, 0)
  c.freeze.seeds = (0, 1, 2)
  c.freeze.steps = 2000
  c.scratch.fractaldb_norms = ()  # FractalDB at 32x32: configure c.fractaldb like c.source
  c.tune.experiments = ()  # the configured rate: a grid costs a run per cell and factor
  return c
