"""VGG-11 with BatchNorm (Simonyan & Zisserman, ICLR 2015); other depths: --config.model.name=vgg16.

    python -m cnn_arch.main --config=configs/vgg.py

Default: `vgg11_bn` at reduced width with the small-input stem on the embedded offline digits
dataset at 32x32, trained from scratch; minutes on a 2-core CPU (see README for the measured
accuracy). Results land in runs/vgg/.
Real data (GPU): --config=configs/vgg.py:cifar10 (from scratch), or :cifar10_finetune from
torchvision's ImageNet weights converted into weights/vgg11_bn (see README), e.g.
--config.finetune.freeze_depth=2.
"""

from cnn_arch import config


def get_config(arg=None):
  c = config.base()
  c.model.name = 'vgg11_bn'
  c.model.options = config.ConfigDict(dict(width=0.25, cifar_stem=True))
  c.train.batch_size = 64
  c.train.num_epochs = 8.0
  c.optim.learning_rate = 0.05
  return config.variant(c, arg, pretrained_dir='weights/vgg11_bn')
