"""Training and inference throughput of cnn_arch models, with an optional PyTorch side-by-side.

    python experiments/benchmark.py --model=resnet18 --image_size=32 --batch=128 --cifar_stem \
        --freeze_depth=0 [--conv=auto] [--torch] [--out=results/bench.jsonl]
    python experiments/benchmark.py --suite=convs --cifar_stem --conv=auto  # whole step, XLA vs ops
    python experiments/benchmark.py --suite=options --cifar_stem \
        --xla_option=xla_cpu_experimental_ynn_fusion_type=  # whole step, XLA compile options A/B
    /work/venv-torch/bin/python experiments/benchmark.py --suite=vs_torch --cifar_stem --conv=auto
    python experiments/benchmark.py --suite=layers    # per-layer conv: plain XLA vs cnn_arch.ops
    python experiments/benchmark.py --suite=lecture   # ResNet-50 vs ResNeXt-50, BN vs GN
    python experiments/benchmark.py --suite=frozen    # frozen-head vs full training step
    python experiments/benchmark.py --suite=profile --cifar_stem   # where the CPU step's time goes
    python experiments/benchmark.py --model=resnet50 --image_size=224 --batch=256 \
        --dtype=bfloat16 --steps=20   # on a GPU: img/s and train_vs_ceiling (bf16 matmul rate)

Each measurement prints, and appends to --out, one JSON line: images/s of the jitted train step
(value_and_grad of cross-entropy + optax SGD momentum, frozen-prefix convention of
`cnn_arch.models.common.run_stages`) and of inference, the median of --steps timed calls after
a warm-up, compile time, peak RSS, MACs per image (XLA cost analysis of the compiled forward / 2)
and achieved GFLOP/s against a measured 4096^2 float32 matmul. --torch (run it with an
interpreter that has torch, e.g. /work/venv-torch/bin/python) adds the torchvision model's
images/s with 2 threads, channels-last, same batch and float32. Numbers are in BENCHMARKS.md.
"""

import argparse
import collections
import glob
import json
import os
import re
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from cnn_arch import models
from cnn_arch.ops import conv as fast_conv
from cnn_arch.ops import memory

# auto: cnn_arch.ops' per-backend default (fast op for 1x1 convolutions on CPU, else lax).
CONVS = {'xla': lax.conv_general_dilated, 'fast': fast_conv.conv_general_dilated,
         'auto': fast_conv.default_conv_general_dilated}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--suite', default='single',
                 choices=('single', 'convs', 'options', 'vs_torch', 'layers', 'lecture',
                          'frozen', 'profile'))
  p.add_argument('--model', default='resnet18')
  p.add_argument('--image_size', type=int, default=32)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--freeze_depth', type=int, default=0)
  p.add_argument('--cifar_stem', action='store_true')
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--layer_set', default='resnet18_cifar', choices=tuple(LAYER_SETS),
                 help='convolutions timed by --suite=layers')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='compute dtype (parameters and optimizer stay float32)')
  p.add_argument('--norm', default='batch', choices=('batch', 'group', 'none'))
  p.add_argument('--num_classes', type=int, default=10)
  p.add_argument('--conv', default='auto', choices=tuple(CONVS),
                 help="auto: what the models use (cnn_arch.ops' per-backend default); xla: plain "
                      'lax everywhere; fast: the custom-VJP op everywhere')
  p.add_argument('--torch', action='store_true', help='also time the torchvision model')
  p.add_argument('--steps', type=int, default=5, help='timed calls (median reported)')
  p.add_argument('--no_infer', action='store_true', help='skip the inference timing')
  p.add_argument('--malloc', default='keep', choices=('keep', 'default'),
                 help='keep: cnn_arch.ops.memory.keep_freed_memory() (no per-step page faults)')
  p.add_argument('--out', default=None, help='JSON-lines file to append results to')
  p.add_argument('--xla_option', action='append', default=[], metavar='NAME=VALUE',
                 help='XLA compile option (DebugOptions field) for every compile; repeatable. '
                      'With --suite=options, the variant timed against the default options.')
  args = p.parse_args(argv)
  args.xla_options = xla_options(args.xla_option)
  return args


def xla_options(pairs):
  """{'name': 'value'} from NAME=VALUE strings (an empty VALUE clears a repeated field)."""
  options = {}
  for pair in pairs:
    name, sep, value = pair.partition('=')
    if not sep or not name.startswith('xla_'):
      raise ValueError(f'--xla_option {pair!r}: expected NAME=VALUE with an xla_* NAME, e.g. '
                       'xla_cpu_experimental_ynn_fusion_type=')
    options[name] = value
  return options


def timed(fn, *args, steps):
  """Median wall time of `steps` calls of fn(*args) after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_ceiling(n=4096, steps=5, dtype=jnp.float32):
  """Achieved GFLOP/s of an n x n jnp matmul in `dtype`: the machine's practical ceiling."""
  a = jnp.ones((n, n), dtype)
  return 2 * n ** 3 / timed(jax.jit(lambda a: a @ a), a, steps=steps) / 1e9


def compile_fn(fn, *args, options=None):
  """(compiled, seconds to lower+compile, XLA flop count) of jax.jit(fn) at args."""
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile(compiler_options=options or None)
  seconds = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, seconds, float(cost.get('flops', 0.0)) if cost else 0.0


def make_train_step(model, tx, frozen):
  """The benchmark train step: SGD-momentum on cross-entropy, first `frozen` stages frozen."""
  def train_step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, state = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                                  frozen=frozen, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state['batch_stats'], opt_state, loss
  return train_step


def optimizer(params, stage_names, frozen):
  """SGD momentum on the trainable stages; frozen stages get `set_to_zero` and no state."""
  frozen_names = set(stage_names[:frozen])
  labels = {k: 'frozen' if k in frozen_names else 'train' for k in params}
  return optax.multi_transform({'train': optax.sgd(0.1, momentum=0.9),
                                'frozen': optax.set_to_zero()}, labels)


def setup_jax(args, *, model_name=None, norm=None, conv=None, frozen=None, options=None):
  """Compiles the train step and the forward pass; returns them with their inputs and costs."""
  options = args.xla_options if options is None else options
  model_name, norm = model_name or args.model, norm or args.norm
  conv, frozen = conv or args.conv, args.freeze_depth if frozen is None else frozen
  opts = dict(norm=norm, width=args.width, conv_general_dilated=CONVS[conv],
              dtype=jnp.dtype(args.dtype))
  if model_name.startswith('res'):
    opts['cifar_stem'] = args.cifar_stem
  model = models.get_model(model_name, num_classes=args.num_classes, **opts)
  shape = (args.batch, args.image_size, args.image_size, 3)
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
  y = jax.random.randint(jax.random.key(1), (args.batch,), 0, args.num_classes)
  variables = jax.jit(model.init)(jax.random.key(2), x[:1])
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  tx = optimizer(params, model.stage_names, frozen)
  state = (params, batch_stats, tx.init(params))
  step, compile_s, step_flops = compile_fn(make_train_step(model, tx, frozen), *state, x, y,
                                           options=options)
  fwd, _, fwd_flops = compile_fn(lambda v, x: model.apply(v, x, train=False), variables, x,
                                 options=options)
  info = dict(framework='jax', model=model_name, norm=norm, conv=conv, frozen=frozen,
              batch=args.batch, image_size=args.image_size, width=args.width, dtype=args.dtype,
              cifar_stem=args.cifar_stem, backend=jax.default_backend(), compile_s=compile_s,
              xla_options=options,
              macs_per_image=fwd_flops / 2 / args.batch)
  return dict(info=info, train=(step, (*state, x, y)), infer=(fwd, (variables, x)),
              flops={'train': step_flops, 'infer': fwd_flops})


def bench_jax(args, *, infer=True, **kw):
  """One JAX measurement (dict) of the configured model."""
  s = setup_jax(args, **kw)
  result = dict(s['info'], malloc=args.malloc)
  for kind in ('train', 'infer') if infer else ('train',):
    fn, fn_args = s[kind]
    seconds = timed(fn, *fn_args, steps=args.steps)
    result.update({f'{kind}_img_s': args.batch / seconds,
                   f'{kind}_gflop_s': s['flops'][kind] / seconds / 1e9})
  result['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return result


def run_interleaved(args, setups, suite, label):
  """Times the setups (name -> setup_jax result; the first is the reference) round by round, so
  all see the same machine load; reports medians and the median per-round speed-up."""
  times = {(name, kind): [] for name in setups for kind in ('train', 'infer')}
  for _ in range(args.steps):
    for kind in ('train', 'infer'):
      for name, s in setups.items():
        fn, fn_args = s[kind]
        times[name, kind].append(timed(fn, *fn_args, steps=1))
  ref, other = list(setups)
  result = dict(setups[ref]['info'], suite=suite, rounds=args.steps, malloc=args.malloc, **label)
  for (name, kind), ts in times.items():
    result[f'{name}_{kind}_img_s'] = args.batch / float(np.median(ts))
  for kind in ('train', 'infer'):
    ratio = np.array(times[ref, kind]) / np.array(times[other, kind])
    result[f'{kind}_speedup'] = float(np.median(ratio))
  result['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  emit(result, args.out)


def run_convs(args):
  """Plain XLA vs --conv (fast if --conv=xla) convolution (whole step, one process, interleaved)."""
  other = 'fast' if args.conv == 'xla' else args.conv
  setups = {conv: setup_jax(args, conv=conv) for conv in ('xla', other)}
  run_interleaved(args, setups, 'convs', dict(conv=f'xla vs {other}'))


def run_options(args):
  """Default XLA compile options vs --xla_option (whole step, one process, interleaved)."""
  if not args.xla_options:
    raise ValueError('--suite=options needs at least one --xla_option=NAME=VALUE to compare.')
  setups = {'default': setup_jax(args, options={}),
            'options': setup_jax(args, options=args.xla_options)}
  run_interleaved(args, setups, 'options', dict(xla_options=args.xla_options))


def torch_model(name, num_classes, cifar_stem, norm):
  """The torchvision counterpart of a cnn_arch ResNet/ResNeXt (3x3 stem, no max pool for CIFAR)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  kw = {} if norm == 'batch' else {'norm_layer': lambda c: torch.nn.GroupNorm(32, c)}
  net = getattr(torchvision.models, name)(num_classes=num_classes, **kw)
  if cifar_stem:
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  return net


def setup_torch(args, *, model_name=None, norm=None, frozen=None):
  """(train_step, infer, info) closures of the torchvision model (2 threads, channels-last)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  model_name, norm = model_name or args.model, norm or args.norm
  frozen = args.freeze_depth if frozen is None else frozen
  net = torch_model(model_name, args.num_classes, args.cifar_stem, norm)
  net = net.to(memory_format=torch.channels_last)
  stages = [['conv1', 'bn1'], ['layer1'], ['layer2'], ['layer3'], ['layer4']][:frozen]
  for name in sum(stages, []):
    getattr(net, name).requires_grad_(False).eval()
  x = torch.randn(args.batch, 3, args.image_size, args.image_size).to(
      memory_format=torch.channels_last)
  y = torch.randint(0, args.num_classes, (args.batch,))
  opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9)

  def train_step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()

  def infer():
    with torch.no_grad():
      net.eval()(x)
    net.train()
    for name in sum(stages, []):
      getattr(net, name).eval()

  info = dict(framework='torch', torch_version=torch.__version__, model=model_name, norm=norm,
              frozen=frozen, batch=args.batch, image_size=args.image_size,
              threads=torch.get_num_threads())
  return train_step, infer, info


def median_s(fn, steps):
  """Median wall time of `steps` calls of fn() after one warm-up call."""
  fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench_torch(args, *, model_name=None, norm=None, frozen=None):
  """PyTorch eager train/inference images/s of the same network (2 threads, channels-last)."""
  train_step, infer, info = setup_torch(args, model_name=model_name, norm=norm, frozen=frozen)
  return dict(info, train_img_s=args.batch / median_s(train_step, args.steps),
              infer_img_s=args.batch / median_s(infer, args.steps))


def run_vs_torch(args):
  """JAX (--conv, --xla_option) vs PyTorch training step, one process, interleaved round by
  round (one warm call each), so both see the same load; reports medians and the median
  per-round JAX/PyTorch speed ratio (> 1: JAX faster)."""
  s = setup_jax(args)
  fn, fn_args = s['train']
  torch_step, _, _ = setup_torch(args)
  jax.block_until_ready(fn(*fn_args))
  torch_step()
  times = {'jax': [], 'torch': []}
  for _ in range(args.steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*fn_args))
    times['jax'].append(time.perf_counter() - t)
    t = time.perf_counter()
    torch_step()
    times['torch'].append(time.perf_counter() - t)
  result = dict(s['info'], suite='vs_torch', rounds=args.steps, malloc=args.malloc,
                jax_train_img_s=args.batch / float(np.median(times['jax'])),
                torch_train_img_s=args.batch / float(np.median(times['torch'])),
                jax_over_torch_speed=float(np.median(np.array(times['torch']) /
                                                     np.array(times['jax']))))
  emit(result, args.out)


def emit(result, out):
  """Prints one result line and appends it to `out`."""
  line = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
  print(line, flush=True)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'a') as f:
      f.write(line + '\n')


def run_single(args):
  ceiling = matmul_ceiling(dtype=jnp.dtype(args.dtype))
  result = bench_jax(args, infer=not args.no_infer)
  result.update(matmul_gflop_s=ceiling, train_vs_ceiling=result['train_gflop_s'] / ceiling)
  emit(result, args.out)
  if args.torch:
    emit(bench_torch(args), args.out)


def run_frozen(args):
  """Full vs head-only training step (frozen = number of body stages), same process."""
  num_body = len(models.get_model(args.model, num_classes=args.num_classes).stage_names) - 1
  full = bench_jax(args, frozen=0, infer=False)
  head = bench_jax(args, frozen=num_body, infer=False)
  for r in (full, head):
    emit(r, args.out)
  emit(dict(suite='frozen', model=args.model, conv=args.conv, frozen=num_body,
            frozen_over_full_time=full['train_img_s'] / head['train_img_s']), args.out)


def run_lecture(args):
  """ResNeXt-50 32x4d vs ResNet-50 (near-equal MACs) and GroupNorm vs BatchNorm, training step."""
  runs = {'resnet50': ('resnet50', 'batch'), 'resnext50': ('resnext50_32x4d', 'batch'),
          'resnet50_gn': ('resnet50', 'group')}
  res = {key: bench_jax(args, model_name=m, norm=n, infer=False) for key, (m, n) in runs.items()}
  for r in res.values():
    emit(r, args.out)
  t = lambda k: 1 / res[k]['train_img_s']
  summary = dict(suite='lecture', framework='jax', conv=args.conv, batch=args.batch,
                 image_size=args.image_size,
                 resnext_over_resnet_time=t('resnext50') / t('resnet50'),
                 macs_ratio=res['resnext50']['macs_per_image'] / res['resnet50']['macs_per_image'],
                 gn_over_bn_time=t('resnet50_gn') / t('resnet50'))
  if args.torch:
    tres = {key: bench_torch(args, model_name=m, norm=n) for key, (m, n) in runs.items()}
    for r in tres.values():
      emit(r, args.out)
    tt = lambda k: 1 / tres[k]['train_img_s']
    summary.update(torch_resnext_over_resnet_time=tt('resnext50') / tt('resnet50'),
                   torch_gn_over_bn_time=tt('resnet50_gn') / tt('resnet50'))
  emit(summary, args.out)


# CIFAR ResNet-18's convolutions: (name, input size, in channels, out channels, kernel, stride).
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


def layer_fns(conv, k, s, x, w, g, options=None):
  """Compiled forward, input-gradient and weight-gradient functions of one convolution."""
  p = k // 2
  f = lambda x, w: conv(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  fns = {'fwd': lambda x, w: f(x, w),
         'dx': lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0],
         'dw': lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0]}
  return {part: compile_fn(fn, x, w, *((g,) if part != 'fwd' else ()), options=options)[0]
          for part, fn in fns.items()}


def weight_grad_kernel_fn(k, x, g):
  """XLA's stride-1 weight-gradient convolution alone, as a (x, w, g) timing closure: its
  operands are transposed beforehand into the layout Eigen's kernel reads (x as CHWN, g as
  HWNC), so `dw` minus this is what the two transposes cost."""
  xt, gt = jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3))
  p = k // 2
  kernel = compile_fn(lambda a, b: lax.conv_general_dilated(
      a, b, (1, 1), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')), xt, gt)[0]
  return lambda x, w, g: kernel(xt, gt)


def run_layers(args):
  """Per-layer forward / input-gradient / weight-gradient time: plain XLA, cnn_arch.ops' op and
  its CPU default ('auto'), and with --xla_option also under those compile options ('+opt').

  The variants are interleaved and each reported time is the minimum over 3 rounds of the
  median of --steps calls, the most load-robust statistic on a shared machine. Stride-1 layers
  also report `xla_dw_kernel_ms`, the weight-gradient kernel without its input transposes.
  """
  variants = {conv: (fn, {}) for conv, fn in CONVS.items()}
  if args.xla_options:
    variants.update({f'{conv}+opt': (fn, args.xla_options) for conv, fn in CONVS.items()})
  for name, size, cin, cout, k, s in LAYER_SETS[args.layer_set]:
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
          t = timed(fn, x, w, *((g,) if part != 'fwd' else ()), steps=args.steps)
          best[v, part] = min(best.get((v, part), np.inf), t)
    gflop = 2 * g.size * k * k * cin / 1e9
    result = dict(suite='layers', layer=name, shape=f'{size}x{size}x{cin}->{cout} k{k} s{s}',
                  batch=args.batch, gflop=gflop, xla_options=args.xla_options)
    for (v, part), t in best.items():
      result[f'{v}_{part}_ms'] = 1e3 * t
    emit(result, args.out)


def xla_cpu_events(profile):
  """(op name, start ns, duration ns) of the XLA ops in a `jax.profiler.ProfileData`'s host plane.

  XLA:CPU records one event per executed HLO instruction on its thread-pool lines (`tf_XLA*`),
  next to runtime spans (`ThunkExecutor::Execute`, `end: ...`) that are not ops and are skipped.
  """
  plane = profile.find_plane_with_name('/host:CPU')
  return [(e.name, e.start_ns, e.duration_ns) for line in plane.lines
          if line.name.startswith('tf_XLA') for e in line.events
          if re.fullmatch(r'[\w.-]+', e.name)]


def _covered_ns(intervals):
  """Length of the union of (start, end) intervals."""
  total, end = 0.0, -np.inf
  for s, e in sorted(intervals):
    total += max(0.0, e - max(s, end))
    end = max(end, e)
  return total


def op_times(events, steps):
  """Per op category (HLO name without its `.N` suffix, e.g. `transpose_copy_fusion`), per step:
  {category: (thread ms, wall ms its events cover, count)}, and the wall ms all ops cover."""
  by_op = collections.defaultdict(list)
  for name, start, duration in events:
    by_op[re.sub(r'\.\d+$', '', name)].append((start, start + duration))
  per_step = lambda ns: ns / steps / 1e6
  ops = {op: (per_step(sum(e - s for s, e in iv)), per_step(_covered_ns(iv)), len(iv) / steps)
         for op, iv in by_op.items()}
  return ops, per_step(_covered_ns([iv for ivs in by_op.values() for iv in ivs]))


def run_profile(args):
  """Where the train step's time goes on XLA:CPU: a `jax.profiler` trace of --steps steps, per
  op category (`op_times`), largest first, then a summary line.

  XLA:CPU's trace times fusions, copies and YNNPACK calls, but an Eigen convolution's event only
  marks its launch (the kernel runs asynchronously), so the step time the timed ops leave
  uncovered, `untimed_ms`, is the convolution kernels (and any idle time).
  """
  if jax.default_backend() != 'cpu':
    raise ValueError(f'--suite=profile reads XLA:CPU traces; on {jax.default_backend()}, '
                     'record one with jax.profiler.trace and open it in TensorBoard/XProf.')
  s = setup_jax(args)
  fn, fn_args = s['train']
  step_ms = 1e3 * timed(fn, *fn_args, steps=args.steps)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        jax.block_until_ready(fn(*fn_args))
    path, = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
    events = xla_cpu_events(jax.profiler.ProfileData.from_file(path))
  ops, ops_wall_ms = op_times(events, args.steps)
  info = {k: s['info'][k] for k in ('model', 'batch', 'image_size', 'conv', 'frozen', 'norm')}
  for op, (thread_ms, wall_ms, count) in sorted(ops.items(), key=lambda kv: -kv[1][0]):
    if thread_ms >= 0.5:
      emit(dict(info, suite='profile', op=op, thread_ms=thread_ms, wall_ms=wall_ms,
                per_step=count), args.out)
  emit(dict(info, suite='profile', step_ms=step_ms, ops_wall_ms=ops_wall_ms,
            untimed_ms=step_ms - ops_wall_ms), args.out)


def main(argv=None):
  args = parse_args(argv)
  if args.malloc == 'keep':
    memory.keep_freed_memory()
  suites = {'single': run_single, 'convs': run_convs, 'options': run_options,
            'vs_torch': run_vs_torch, 'layers': run_layers, 'frozen': run_frozen,
            'lecture': run_lecture, 'profile': run_profile}
  suites[args.suite](args)


if __name__ == '__main__':
  main()
