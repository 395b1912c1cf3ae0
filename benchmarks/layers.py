"""Per-layer convolution time: forward, input gradient and weight gradient of each convolution
of a network, for plain XLA (`xla`), cnn_arch.ops' custom-VJP op (`fast`) and the models'
default (`auto`), and with --xla_option also under those compile options (`+opt`).

    python -m benchmarks.layers [--layer_set=resnet18_cifar|small_maps] [--layers=stem,stage1]
        [--batch=128 --steps=3] [--xla_option=NAME=VALUE] [--out=FILE.jsonl]

The variants are interleaved, and each time is the minimum over 3 rounds of the median of
--steps calls, the most load-robust statistic on a shared machine. Stride-1 layers also report
`xla_dw_kernel_ms`, XLA's weight-gradient convolution on operands already transposed into the
layout its kernel reads: `xla_dw_ms` minus it is what the two transposes cost.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common

# (name, input size, in channels, out channels, kernel, stride)
RESNET18_CIFAR_LAYERS = (
    ('stem', 32, 3, 64, 3, 1), ('stage1', 32, 64, 64, 3, 1), ('stage2/down3x3', 32, 64, 128, 3, 2),
    ('stage2/down1x1', 32, 64, 128, 1, 2), ('stage2', 16, 128, 128, 3, 1),
    ('stage3/down3x3', 16, 128, 256, 3, 2), ('stage3/down1x1', 16, 128, 256, 1, 2),
    ('stage3', 8, 256, 256, 3, 1), ('stage4/down3x3', 8, 256, 512, 3, 2),
    ('stage4/down1x1', 8, 256, 512, 1, 2), ('stage4', 4, 512, 512, 3, 1))
# Small maps, where `auto` computes a 3x3 convolution whose output is smaller than its kernel
# as one im2col matrix product (ResNet-50's stage 4 at 64x64), next to sizes where it does not.
SMALL_MAP_LAYERS = (
    ('r50_stage4', 2, 512, 512, 3, 1), ('r50_stage4/down3x3', 4, 256, 512, 3, 2),
    ('4x4', 4, 256, 256, 3, 1), ('r18_stage4', 4, 512, 512, 3, 1),
    ('r18_stage3', 8, 256, 256, 3, 1))
LAYER_SETS = {'resnet18_cifar': RESNET18_CIFAR_LAYERS, 'small_maps': SMALL_MAP_LAYERS}
COLUMNS = ['layer', 'shape', 'batch'] + [f'{v}_{part}_ms' for v in ('xla', 'fast', 'auto')
                                         for part in ('fwd', 'dx', 'dw')]


def compile_fn(fn, *args, options=None):
  return jax.jit(fn).lower(*args).compile(compiler_options=options or None)


def layer_fns(conv, k, s, x, w, g, options=None):
  """Compiled forward, input-gradient and weight-gradient functions of one convolution."""
  p = k // 2
  f = lambda x, w: conv(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  fns = {'fwd': lambda x, w: f(x, w),
         'dx': lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0],
         'dw': lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0]}
  return {part: compile_fn(fn, x, w, *((g,) if part != 'fwd' else ()), options=options)
          for part, fn in fns.items()}


def weight_grad_kernel_fn(k, x, g):
  """XLA's stride-1 weight-gradient convolution alone, as a (x, w, g) timing closure: its
  operands are transposed beforehand into the layout Eigen's kernel reads (x as CHWN, g as
  HWNC)."""
  xt, gt = jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3))
  p = k // 2
  kernel = compile_fn(lambda a, b: lax.conv_general_dilated(
      a, b, (1, 1), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')), xt, gt)
  return lambda x, w, g: kernel(xt, gt)


def measure(args, variants, name, size, cin, cout, k, s) -> dict:
  x = jax.random.normal(jax.random.key(0), (args.batch, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / np.sqrt(k * k * cin)
  g = jax.random.normal(jax.random.key(2), (args.batch, -(-size // s), -(-size // s), cout))
  fns = {v: layer_fns(fn, k, s, x, w, g, opts) for v, (fn, opts) in variants.items()}
  if s == 1:
    fns['xla']['dw_kernel'] = weight_grad_kernel_fn(k, x, g)
  best = {}
  for _ in range(3):
    for v, parts in fns.items():
      for part, fn in parts.items():
        t = common.timed(fn, x, w, *((g,) if part != 'fwd' else ()), steps=args.steps)
        best[v, part] = min(best.get((v, part), np.inf), t)
  row = dict(suite='layers', layer=name, shape=f'{size}x{size}x{cin}->{cout} k{k} s{s}',
             batch=args.batch, gflop=2 * g.size * k * k * cin / 1e9,
             xla_options=args.xla_options, **common.machine())
  row.update({f'{v}_{part}_ms': 1e3 * t for (v, part), t in best.items()})
  return row


def main(argv=None):
  p = common.parser(__doc__, __spec__.name, steps=3, model=False)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--layer_set', default='resnet18_cifar', choices=tuple(LAYER_SETS))
  p.add_argument('--layers', default=None, help='comma-separated layer names (default: all)')
  args = common.parse(p, argv)
  variants = {conv: (fn, {}) for conv, fn in common.CONVS.items()}
  if args.xla_options:
    variants.update({f'{conv}+opt': (fn, args.xla_options) for conv, fn in common.CONVS.items()})
  layers = LAYER_SETS[args.layer_set]
  if args.layers:
    wanted = args.layers.split(',')
    unknown = set(wanted) - {layer[0] for layer in layers}
    if unknown:
      raise SystemExit(f'--layers: {sorted(unknown)} not in --layer_set={args.layer_set}: '
                       f'{", ".join(layer[0] for layer in layers)}')
    layers = [layer for layer in layers if layer[0] in wanted]
  rows = []
  for layer in layers:  # each row is written as soon as it is measured
    rows.append(measure(args, variants, *layer))
    common.write_jsonl(rows[-1:], args.out)
  columns = COLUMNS + ['xla_dw_kernel_ms'] + [f'{v}_{part}_ms' for v in variants if '+' in v
                                              for part in ('fwd', 'dx', 'dw')]
  common.report(rows, columns, None,
                title=f'layers ({args.layer_set}), ms: minimum over 3 rounds of the median of '
                      f'{args.steps} calls')
  return rows


if __name__ == '__main__':
  main()
