"""Pretraining vs training from scratch on CIFAR-10 and on a small subset of it (GPU).

    python -m experiments.scratch_vs_pretrained \
        --config=configs/experiments/cifar10_scratch.py --out=results/cifar10_scratch
    python -m experiments.scratch_vs_pretrained \
        --config=configs/experiments/cifar10_scratch.py:imagenet --out=results/cifar10_scratch_in
    python -m experiments.report --out=results/cifar10_scratch

Default (`cifar100`): as He et al. (2019) compare both normalisations, a full-width CIFAR ResNet-18
is pretrained on CIFAR-100 once with BatchNorm and once with GroupNorm (32x32, 60 epochs each),
then CIFAR-10 is trained from scratch and fine-tuned from it for 1x, 2x and 4x a 3,000-step
schedule (batch 128; 1x is about 8 epochs of the full set), on all 5,000 and on 100 examples per
class, two seeds. `imagenet`: the BatchNorm arm only, fine-tuned from torchvision's ImageNet
ResNet-18 (weights/resnet18, see docs/weights.md) at 224x224 -- torchvision has no GroupNorm
ResNet weights. Both need cifar10 (and cifar100) prepared by tfds with internet once.
"""

from configs.experiments import cifar100_to_cifar10, digits


def get_config(arg=None):
  arg = arg or 'cifar100'
  if arg not in ('cifar100', 'imagenet'):
    raise ValueError(f'Unknown variant {arg!r} of cifar10_scratch; choose cifar100 or imagenet.')
  c = cifar100_to_cifar10.get_config()
  c.name = f'cifar10_scratch_{arg}'
  c.scratch.per_class = (100, 0)
  c.scratch.norms = ('batch', 'group')
  c.scratch.schedules = (1, 2, 4)
  c.scratch.steps_1x = 3000
  c.scratch.seeds = (0, 1)
  c.scratch.num_evals = 6
  c.target.optim.learning_rate = 0.1  # both arms share it, as in He et al.
  if arg == 'imagenet':
    c.init_from = 'weights/resnet18'
    c.scratch.norms = ('batch',)
    c.target.model.options = digits.config.ConfigDict(dict(norm='batch'))
    c.target.data.image_size = 224
    c.target.train.batch_size = 64
  return c
