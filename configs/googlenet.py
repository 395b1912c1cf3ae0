"""GoogLeNet / Inception v1 (Szegedy et al., CVPR 2015), as torchvision builds it.

    python -m cnn_arch.main --config=configs/googlenet.py

Default: `googlenet` at reduced width with the small-input stem on the embedded offline digits
dataset at 16x16 (the digits are 8x8; 32x32 quadruples the cost), trained from scratch; minutes on
a 2-core CPU (see README for the measured accuracy). Results land in runs/googlenet/.
Real data (GPU): --config=configs/googlenet.py:cifar10 (from scratch), or :cifar10_finetune from
torchvision's ImageNet weights converted into weights/googlenet (see README), e.g.
--config.finetune.freeze_depth=2.
"""

from cnn_arch import config


def get_config(arg=None):
  c = config.base()
  c.model.name = 'googlenet'
  c.model.options = config.ConfigDict(dict(width=0.25, cifar_stem=True))
  c.data.image_size = 16
  c.train.batch_size = 64
  c.train.num_epochs = 8.0
  c.optim.learning_rate = 0.05
  c = config.variant(c, arg, pretrained_dir='weights/googlenet')
  if arg == 'cifar10_finetune':  # torchvision's ImageNet weights re-normalise their input
    c.model.options.transform_input = True
  return c
