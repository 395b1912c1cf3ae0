"""Freeze-depth sweep on CIFAR-10, fine-tuned from torchvision's ImageNet ResNet-18 (GPU).

    python -m cnn_arch.convert --arch=resnet18 --src=resnet18-f37072fd.pth --out=weights/resnet18
    python -m experiments.freeze_sweep --config=configs/experiments/cifar10_freeze.py \
        --out=results/cifar10_freeze
    python -m experiments.features_l2 --config=configs/experiments/cifar10_freeze.py \
        --out=results/cifar10_freeze        # k-NN / linear probe of ImageNet vs random features
    python -m experiments.report --out=results/cifar10_freeze

CIFAR-10 images are resized to 224 (what the ImageNet weights expect, standard stem); the
lecture's recipe replaces the 1000-way head by a fresh 10-way one. Every freeze depth 0..5
(stem, stage1..4) at 1, 10, 100 and 1000 training examples per class, three seeds (each a
different subset), a fixed 1,000 SGD steps per run (batch 64; the 10-example view trains with
batch 10). Needs the weights (see docs/weights.md) and CIFAR-10 prepared by tfds: run
`tfds build cifar10` once with internet, then set data.data_dir if it is not ~/tensorflow_datasets.
Cost: 72 runs of 1,000 steps at 224x224, a few GPU-hours.
"""

from configs.experiments import digits


def get_config(arg=None):
  del arg
  c = digits.get_config()
  c.name = 'cifar10_freeze'
  c.init_from = 'weights/resnet18'  # `python -m cnn_arch.convert` output, see above
  t = c.target
  t.model.options = digits.config.ConfigDict(dict(norm='batch'))
  t.data.name = 'cifar10'
  t.data.classes = None
  t.data.eval_split = None  # `validation` where the dataset has one, else `test`
  t.data.image_size = 224
  t.data.download = False  # fail at once with the tfds build command if it is missing
  t.train.batch_size = 64
  t.train.eval_batch_size = 500
  t.optim.learning_rate = 0.01
  c.freeze.per_class = (1, 10, 100, 1000)
  c.freeze.depths = ()
  c.freeze.seeds = (0, 1, 2)
  c.freeze.steps = 1000
  c.features.queries = 8
  c.scratch.fractaldb_norms = ()
  c.tune.experiments = ()  # the configured rate: a grid costs a run per cell and factor
  return c
