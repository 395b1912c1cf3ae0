"""AlexNet (Krizhevsky et al., NeurIPS 2012), the single-tower layout of the paper and the lecture.

    python -m cnn_arch.main --config=configs/alexnet.py

Default: `alexnet` at reduced width with the small-input stem on the embedded offline digits
dataset at 32x32, trained from scratch; minutes on a 2-core CPU (see README for the measured
accuracy). Results land in runs/alexnet/.
Real data (GPU): --config=configs/alexnet.py:cifar10 (from scratch), or :cifar10_finetune from
torchvision's ImageNet weights converted into weights/alexnet (see README), e.g.
--config.finetune.freeze_depth=2.
"""

from cnn_arch import config


def get_config(arg=None):
  c = config.base()
  c.model.name = 'alexnet'
  c.model.options = config.ConfigDict(dict(norm='none', width=0.25, cifar_stem=True))
  c.train.batch_size = 64
  c.train.num_epochs = 8.0
  c.optim.learning_rate = 0.01
  c = config.variant(c, arg, pretrained_dir='weights/alexnet')
  if arg == 'cifar10_finetune':  # torchvision's AlexNet weights are the one-weird-trick layout
    c.model.name = 'alexnet_tv'
  return c
