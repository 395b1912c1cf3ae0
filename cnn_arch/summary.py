"""`python -m cnn_arch.summary`: the per-layer analysis of a registered model, and the lecture's
arithmetic computed rather than quoted.

    python -m cnn_arch.summary --model=alexnet     # the lecture's 227x227 AlexNet
    python -m cnn_arch.summary --model=resnet18 --json
    python -m cnn_arch.summary --demo=stacked3x3   # VGG: three 3x3 convs vs one 7x7
    python -m cnn_arch.summary --demo=inception    # GoogLeNet: the 1x1 reductions

The numbers come from `cnn_arch.analysis.analyze` (a dataflow walk over the traced forward pass).
"""

import argparse
import json
from typing import Sequence

import flax.linen as nn

from cnn_arch import models
from cnn_arch.config import MAX_IMAGE_SIZE
from cnn_arch.analysis import analyze

# The lecture (like Krizhevsky et al.'s arithmetic) feeds AlexNet 227x227 images.
DEFAULT_IMAGE_SIZE = {'alexnet': 227}


def _cell(value) -> str:
  if value is None or value == []:
    return '-'
  return 'x'.join(map(str, value)) if isinstance(value, list) else str(value)


def _table(header, rows, total=None, left: int = 1) -> list[str]:
  """Fixed-width columns: the first `left` left-aligned, the rest (numbers) right-aligned."""
  everything = [header, *rows, *([total] if total else [])]
  widths = [max(len(r[i]) for r in everything) for i in range(len(header))]
  fmt = lambda r: '  '.join(c.ljust(w) if i < left else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  rule = '-' * (sum(widths) + 2 * len(widths) - 2)
  return [fmt(header), rule, *map(fmt, rows), *([rule, fmt(total)] if total else [])]


def format_table(report: dict) -> str:
  """The report of `analyze` as a fixed-width table with totals and the XLA cross-check."""
  rows = [(r['name'], r['op'], _cell(r['output_shape']), f"{r['params']:,}", f"{r['macs']:,}",
           _cell(r['receptive_field']), _cell(r['stride'])) for r in report['layers']]
  total = ('total', '', '', f"{report['total_params']:,}", f"{report['total_macs']:,}", '', '')
  size = report['image_size']
  size = _cell(size if isinstance(size, list) else [size, size])
  lines = [f"{report['model']} on {size} inputs, per image", '',
           *_table(('layer', 'op', 'output', 'params', 'MACs', 'RF', 'stride'), rows, total, 3)]
  flops, macs = report['xla_flops'], report['total_macs']
  if flops is not None and macs:
    lines.append(f'XLA cost analysis: {flops:,.0f} FLOPs = {flops / (2 * macs):.3f} x 2 x MACs '
                 '(XLA skips taps on padding and adds elementwise work)')
  return '\n'.join(lines)


class ConvChain(nn.Module):
  """Stride-1 'same' convolutions without bias, ReLU between; `layers` lists (output channels,
  kernel size). The units of the lecture's VGG and Inception arguments."""
  layers: Sequence[tuple[int, int]]

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # the registry's calling convention
    for i, (features, k) in enumerate(self.layers):
      x = nn.Conv(features, (k, k), padding=((k // 2, k // 2),) * 2, use_bias=False,
                  name=f'conv{i + 1}')(nn.relu(x) if i else x)
    return x


def compare_stacked_3x3(channels: int = 64, image_size: int = 32) -> dict:
  """Simonyan & Zisserman (ICLR 2015): three 3x3 convolutions see 7x7 pixels, like one 7x7
  convolution, with 27 C^2 instead of 49 C^2 weights. Returns both analyses (C -> C channels)."""
  shape = (1, image_size, image_size, channels)
  return {'single': analyze(ConvChain([(channels, 7)]), shape, name='1 x conv7x7'),
          'stacked': analyze(ConvChain([(channels, 3)] * 3), shape, name='3 x conv3x3')}


def compare_inception(image_size: int = 224) -> dict:
  """The lecture's Inception example (Szegedy et al., "Going deeper with convolutions", CVPR 2015)
  on a 28x28x192 input: a 3x3 convolution to 256 channels ('naive') against 3x3 to 64 then 1x1 to
  256 ('reduced'); and GoogLeNet with ('googlenet') and without ('googlenet_naive') the 1x1
  reductions in its inception modules. Returns the four analyses."""
  shape, image = (1, 28, 28, 192), (1, image_size, image_size, 3)
  return {'naive': analyze(ConvChain([(256, 3)]), shape, name='3x3 conv 192->256'),
          'reduced': analyze(ConvChain([(64, 3), (256, 1)]), shape,
                             name='3x3 conv 192->64, 1x1 conv 64->256'),
          'googlenet_naive': analyze(models.get_model('googlenet', naive=True), image,
                                     name='googlenet naive=True'),
          'googlenet': analyze(models.get_model('googlenet'), image, name='googlenet')}


def _comparison(title: str, reports: Sequence[dict], columns: dict) -> list[str]:
  """One row per report, one column per `columns` entry (header -> fn(report) -> str)."""
  rows = [(r['model'], *(fn(r) for fn in columns.values())) for r in reports]
  ratio = reports[0]['total_macs'] / reports[-1]['total_macs']
  return [title, '', *_table(('', *columns), rows), f'MACs ratio: {ratio:.2f}x', '']


def _macs(report: dict) -> str:
  return f"{report['total_macs']:,}"


def _weights(report: dict) -> str:
  return f"{report['total_params']:,}"


def stacked_3x3_text(result: dict) -> str:
  c = result['single']['layers'][0]['output_shape'][-1]
  size = _cell(result['single']['image_size'])
  return '\n'.join(_comparison(
      f'Three stacked 3x3 convolutions vs one 7x7 convolution (C={c}, stride 1, no bias)',
      [result['single'], result['stacked']],
      {'RF per layer': lambda r: ' -> '.join(_cell(l['receptive_field']) for l in r['layers']),
       'weights': _weights, 'weights / C^2': lambda r: f"{r['total_params'] / c**2:g}",
       f'MACs at {size}x{size}': _macs})).rstrip()


def inception_text(result: dict) -> str:
  per_layer = lambda r: ' + '.join(f"{l['macs']:,}" for l in r['layers'])
  size = _cell(result['googlenet']['image_size'])
  return '\n'.join([
      *_comparison('Inception 3x3 branch on a 28x28x192 input (lecture example)',
                   [result['naive'], result['reduced']],
                   {'MACs': _macs, 'per layer': per_layer, 'weights': _weights}),
      *_comparison(f'GoogLeNet at {size}x{size}: naive inception modules vs 1x1 reductions',
                   [result['googlenet_naive'], result['googlenet']],
                   {'MACs': _macs, 'params': _weights})]).rstrip()


# name -> (compute(args) -> dict of analyses, text(dict) -> str)
DEMOS = {'stacked3x3': (lambda args: compare_stacked_3x3(args.channels), stacked_3x3_text),
         'inception': (lambda args: compare_inception(), inception_text)}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m cnn_arch.summary',
                              description=__doc__.split('\n', maxsplit=1)[0])
  p.add_argument('--model', help=f'one of: {", ".join(models.MODELS)}')
  p.add_argument('--image_size', type=int, help='default 227 for alexnet, else 224')
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--option', action='append', default=[], metavar='KEY=VALUE',
                 help='model option, repeatable, e.g. --option naive=True')
  p.add_argument('--json', action='store_true', help='print one JSON object, not a table')
  p.add_argument('--xla', action=argparse.BooleanOptionalAction, default=True,
                 help='cross-check against XLA cost analysis (compiles the model)')
  p.add_argument('--demo', choices=sorted(DEMOS), help='print a lecture comparison instead')
  p.add_argument('--channels', type=int, default=64, help='C of --demo=stacked3x3')
  p.add_argument('--verbose', action='store_true', help='show the traceback of an error')
  return p


def main(argv: Sequence[str] | None = None):
  parser = _parser()
  args = parser.parse_args(argv)
  if args.demo:
    compute, text = DEMOS[args.demo]
    result = compute(args)
    print(json.dumps(result, indent=1) if args.json else text(result))
    return
  if not args.model:
    parser.error('give --model=NAME (e.g. --model=alexnet) or --demo.')
  size = DEFAULT_IMAGE_SIZE.get(args.model, 224) if args.image_size is None else args.image_size
  if not 1 <= size <= MAX_IMAGE_SIZE:
    parser.error(f'--image_size={size} is out of range: use 1 to {MAX_IMAGE_SIZE}.')
  try:
    model = models.get_model(args.model, num_classes=args.num_classes,
                             **dict(models.parse_option(o) for o in args.option))
    report = analyze(model, (1, size, size, 3), name=args.model, xla=args.xla)
  except (ValueError, TypeError) as e:  # unknown model or option, too small: just the fix
    if args.verbose:
      raise
    parser.error(' '.join(str(e).split()))
  print(json.dumps(report, indent=1) if args.json else format_table(report))


if __name__ == '__main__':
  main()
