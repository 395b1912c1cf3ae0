"""The torchvision counterpart of a benchmarked ResNet/ResNeXt, for the PyTorch comparisons.

Eager PyTorch on CPU with 2 threads, channels-last, float32, the same batch and image size:
SGD with momentum on cross-entropy, the first `freeze_depth` stages frozen (no gradient,
inference-mode BatchNorm). Needs `torch` and `torchvision`; `available()` says whether they
import, and the suites skip their PyTorch part with a note where they do not.
"""

import importlib.util
import sys

STAGES = (('conv1', 'bn1'), ('layer1',), ('layer2',), ('layer3',), ('layer4',))


def available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'torchvision'))


def skip_note(what: str) -> None:
  print(f'{what}: skipped, {sys.executable} has no torch/torchvision (use an interpreter that '
        'has both, e.g. $TORCH_PY -m benchmarks.SUITE).', file=sys.stderr)


def torch_model(name: str, num_classes: int, cifar_stem: bool, norm: str):
  """torchvision's `name` (3x3 stride-1 stem and no max pool for the CIFAR stem)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  kw = {} if norm == 'batch' else {'norm_layer': lambda c: torch.nn.GroupNorm(32, c)}
  net = getattr(torchvision.models, name)(num_classes=num_classes, **kw)
  if cifar_stem:
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  return net


class TorchStep:
  """`train()` and `infer()` closures of the torchvision model matching a JAX measurement's
  info (model, norm, cifar_stem, num_classes, freeze_depth, batch, image_size)."""

  def __init__(self, info: dict):
    import torch  # pylint: disable=g-import-not-at-top
    if info['width'] not in (None, 1.0):
      raise ValueError(f'The PyTorch comparison needs width 1 (torchvision has no width '
                       f'option); got width={info["width"]}.')
    torch.set_num_threads(2)
    net = torch_model(info['model'], info['num_classes'], bool(info['cifar_stem']),
                      info['norm'] or 'batch')
    self.net = net.to(memory_format=torch.channels_last)
    self.frozen = [m for stage in STAGES[:info['freeze_depth']] for m in stage]
    for name in self.frozen:
      getattr(self.net, name).requires_grad_(False).eval()
    n, size = info['batch'], info['image_size']
    self.x = torch.randn(n, 3, size, size).to(memory_format=torch.channels_last)
    self.y = torch.randint(0, info['num_classes'], (n,))
    self.opt = torch.optim.SGD([p for p in self.net.parameters() if p.requires_grad], lr=0.1,
                               momentum=0.9)
    self.torch = torch
    self.info = dict(framework='torch', torch_version=torch.__version__, model=info['model'],
                     norm=info['norm'], freeze_depth=info['freeze_depth'], batch=n,
                     image_size=size, threads=torch.get_num_threads())

  def train(self):
    self.opt.zero_grad(set_to_none=True)
    self.torch.nn.functional.cross_entropy(self.net(self.x), self.y).backward()
    self.opt.step()

  def infer(self):
    with self.torch.no_grad():
      self.net.eval()(self.x)
    self.net.train()
    for name in self.frozen:
      getattr(self.net, name).eval()
