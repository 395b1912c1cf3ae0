"""The model registry: every architecture by name, built through `get_model`.

Each model is a Flax Linen module called as
`model.apply(variables, images_nhwc, train=False, frozen=0, features=False)` (see `common`), and
has a `stage_names` property: `('stem', 'stage1', ..., 'head')`, the top-level parameter
collections that freezing and weight import key on.
"""

import difflib

from cnn_arch.models import alexnet, inception, resnet, vgg

MODELS = {
    'alexnet': alexnet.AlexNet,
    'alexnet_tv': alexnet.AlexNetTV,
    'vgg11': vgg.VGG11, 'vgg13': vgg.VGG13, 'vgg16': vgg.VGG16, 'vgg19': vgg.VGG19,
    'vgg11_bn': vgg.VGG11BN, 'vgg13_bn': vgg.VGG13BN, 'vgg16_bn': vgg.VGG16BN,
    'vgg19_bn': vgg.VGG19BN,
    'googlenet': inception.GoogLeNet,
    'resnet18': resnet.ResNet18, 'resnet34': resnet.ResNet34, 'resnet50': resnet.ResNet50,
    'resnet101': resnet.ResNet101, 'resnet152': resnet.ResNet152,
    'resnext50_32x4d': resnet.ResNeXt50_32x4d, 'resnext101_32x8d': resnet.ResNeXt101_32x8d,
}


def get_model(name: str, num_classes: int = 1000, **options):
  """Builds the registered model `name` with `num_classes` outputs and family options."""
  if name not in MODELS:
    close = difflib.get_close_matches(name, MODELS, n=3)
    hint = f' Did you mean {", ".join(close)}?' if close else ''
    raise ValueError(f'Unknown model {name!r}.{hint} Valid names: {", ".join(MODELS)}.')
  return MODELS[name](num_classes=num_classes, **options)
