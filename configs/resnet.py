"""ResNet-18 (He et al., CVPR 2016) on the embedded offline digits dataset.

    python -m cnn_arch.main --config=configs/resnet.py

A quarter-width ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no max-pool) at 32x32,
trained from scratch with SGD + cosine schedule: a few minutes on a 2-core CPU. Results land in
runs/resnet/ (results.json, metrics.jsonl, TensorBoard events, checkpoints).

Other depths: --config.model.name=resnet50. GroupNorm: --config.model.options.norm=group.
Real data (GPU): --config=configs/resnet.py:cifar10 (from scratch) or
configs/resnet.py:cifar10_finetune with torchvision's ImageNet weights converted into
weights/resnet18 (see README), e.g. --config.finetune.freeze_depth=3.
"""

from cnn_arch import config


def get_config(arg=None):
  c = config.base()
  c.model.name = 'resnet18'
  c.model.options = config.ConfigDict(dict(norm='batch', width=0.25, cifar_stem=True))
  c.train.batch_size = 64
  c.train.num_epochs = 8.0
  c.optim.learning_rate = 0.1
  return config.variant(c, arg, pretrained_dir='weights/resnet18')
