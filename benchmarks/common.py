"""What the suites share: flags, the trainer's own step on a synthetic batch, timing, output.

A suite builds a trainer config (`trainer_config`: `--config`'s, then the model flags, then
`--set`), and `TrainerStep` compiles `cnn_arch.train.parallel_steps` for it: the train step
`cnn_arch.main` runs (the config's optimizer, schedule and fine-tuning plan, donated state) and
its eval step. `make_setup` reads the config's dataset for the class count and the image size,
so the default, the embedded offline `digits` view resized to `--image_size`, runs anywhere; the
batches themselves are synthetic. `report` prints a table and appends JSON lines to `--out`.
"""

import argparse
import ast
import json
import math
import os
import resource
import runpy
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import memory
from cnn_arch import config as config_lib
from cnn_arch import train, train_setup
from cnn_arch.ops import conv as conv_ops

# auto: what the models use (cnn_arch.ops' per-backend default: on CPU the project's paths).
CONVS = {'xla': lax.conv_general_dilated, 'fast': conv_ops.conv_general_dilated,
         'auto': conv_ops.default_conv_general_dilated}
MODEL_OPTIONS = ('width', 'norm', 'cifar_stem')  # flags that are `model.options` entries


########## Flags.


def parser(doc: str, module: str, *, config: str = 'base', steps: int = 5, model: bool = True,
           xla: bool = True):
  """The flags every suite takes; `model=True` adds the flags that shape the trainer's config,
  `xla=True` the XLA compile options.

  A model flag left unset keeps the config's value; `config='base'` is cnn_arch.config.base()
  (ResNet-18, width 1, ImageNet stem, batch 128, float32, digits at 32x32).
  """
  p = argparse.ArgumentParser(prog=f'python -m {module}', description=doc,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--steps', type=int, default=steps, help='timed calls (median reported)')
  p.add_argument('--out', default=None, metavar='FILE.jsonl',
                 help='JSON-lines file to append one line per table row to')
  p.add_argument('--malloc', default='keep', choices=('keep', 'default'),
                 help='keep: benchmarks.memory.keep_freed_memory() (no per-step page faults)')
  if xla:
    p.add_argument('--xla_option', action='append', default=[], metavar='NAME=VALUE',
                   help='XLA compile option (DebugOptions field) for every compile; repeatable')
  if not model:
    return p
  p.add_argument('--config', default=config,
                 help="'base' (cnn_arch.config.base()) or a configs/*.py file[:VARIANT]")
  p.add_argument('--model', default=None, help='model.name, e.g. resnet50')
  p.add_argument('--image_size', type=int, default=None, help='data.image_size')
  p.add_argument('--batch', type=int, default=None, help='train.batch_size (global)')
  p.add_argument('--width', type=float, default=None, help='model.options.width')
  p.add_argument('--norm', default=None, choices=('batch', 'group', 'none'))
  p.add_argument('--cifar_stem', default=None, action=argparse.BooleanOptionalAction,
                 help='model.options.cifar_stem (3x3 stride-1 stem, no max pool)')
  p.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                 help='model.dtype: compute dtype (parameters and optimizer stay float32)')
  p.add_argument('--num_classes', type=int, default=None, help='model.num_classes')
  p.add_argument('--freeze_depth', type=int, default=None, help='finetune.freeze_depth')
  p.add_argument('--conv', default='auto', choices=tuple(CONVS),
                 help="auto: what the models use (cnn_arch.ops' per-backend default); xla: "
                      'plain lax everywhere; fast: the custom-VJP op everywhere')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='any config value, e.g. --set=optim.name=adamw; repeatable, applied last')
  return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
  """Parses the flags, and applies `--malloc` before anything large is allocated."""
  args = p.parse_args(argv)
  args.xla_options = xla_options(getattr(args, 'xla_option', ()))
  if args.malloc == 'keep':
    memory.keep_freed_memory()
  return args


def xla_options(pairs) -> dict:
  """{'name': 'value'} from NAME=VALUE strings (an empty VALUE clears a repeated field)."""
  options = {}
  for pair in pairs:
    name, sep, value = pair.partition('=')
    if not sep or not name.startswith('xla_'):
      raise ValueError(f'--xla_option {pair!r}: expected NAME=VALUE with an xla_* NAME, e.g. '
                       'xla_cpu_experimental_ynn_fusion_type=')
    options[name] = value
  return options


########## The trainer's config and step.


def load_config(spec: str) -> config_lib.ConfigDict:
  """'base', or 'configs/X.py[:VARIANT]' (the file's get_config(VARIANT))."""
  if spec == 'base':
    return config_lib.base()
  path, _, arg = spec.partition(':')
  return runpy.run_path(path)['get_config'](arg or None)


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def trainer_config(args: argparse.Namespace, **flags) -> config_lib.ConfigDict:
  """The trainer config the flags describe; `flags` (flag name -> value) replace the parsed ones.

  Feature caching is off and augmentation too, so the step timed is the step over images.
  """
  v = {**vars(args), **flags}
  c = load_config(v['config'])
  c.finetune.cache_features = 'off'
  c.data.augment = False
  for flag, key in (('model', 'name'), ('dtype', 'dtype'), ('num_classes', 'num_classes')):
    if v.get(flag) is not None:
      c.model[key] = v[flag]
  for flag in MODEL_OPTIONS:
    if v.get(flag) is not None:
      c.model.options[flag] = v[flag]
  if v.get('conv', 'auto') != 'auto':
    c.model.options.conv_general_dilated = CONVS[v['conv']]
  if v.get('image_size') is not None:
    c.data.image_size = v['image_size']
  if v.get('batch') is not None:
    c.train.batch_size = v['batch']
  c.train.eval_batch_size = c.train.batch_size
  if v.get('freeze_depth') is not None:
    c.finetune.freeze_depth = v['freeze_depth']
  if v.get('train_stages') is not None:
    c.finetune.train_stages = tuple(v['train_stages'])
  for item in v.get('set', ()):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--set {item!r}: expected KEY=VALUE, e.g. --set=optim.name=adamw')
    *parents, leaf = key.split('.')
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = _literal(value)
  return c


def _compile(jitted, *args, options=None):
  """(executable, XLA's flop count of one device's program) of a jitted function at args."""
  compiled = jitted.lower(*args).compile(compiler_options=options or None)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, float(cost.get('flops', 0.0)) if cost else 0.0


class TrainerStep:
  """The trainer's train and eval steps of `config`, compiled for one synthetic batch.

  `train()` runs one step on the state it donates and waits for it; `infer()` one eval step
  (compiled only with `infer=True`). `flops` holds XLA's count over all devices, `compile_s` the
  train step's compile time.
  """

  def __init__(self, config, xla_options=None, infer: bool = True):
    self.config, self.xla_options = config, dict(xla_options or {})
    self.setup = s = train_setup.make_setup(config)
    self.state = jax.device_put(train.init_state(s, config), s.replicated)
    step, eval_step = train.parallel_steps(s, config, donate=True)
    n, size = config.train.batch_size, s.image_size
    rng = np.random.default_rng(0)
    batch = dict(image=rng.standard_normal((n, size, size, 3), np.float32),
                 label=rng.integers(0, s.model_meta['num_classes'], n).astype(np.int32))
    self.batch = train.to_global(batch, s.batch_sharding)
    self.eval_batch = train.to_global(dict(batch, mask=np.ones(n, np.float32)), s.batch_sharding)
    t = time.perf_counter()
    self._train, train_flops = _compile(step, self.state, self.batch, options=self.xla_options)
    self.compile_s = time.perf_counter() - t
    self.flops = {'train': train_flops * s.mesh.size, 'infer': None}
    if infer:
      self._eval, eval_flops = _compile(eval_step, self.state, self.eval_batch,
                                        options=self.xla_options)
      self.flops['infer'] = eval_flops * s.mesh.size

  def train(self):
    self.state, metrics = self._train(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def infer(self):
    jax.block_until_ready(self._eval(self.state, self.eval_batch))

  def info(self) -> dict:
    """What identifies the measurement: model, options, plan, batch, backend, compile time."""
    s, c = self.setup, self.config
    conv_fn = c.model.options.get('conv_general_dilated', CONVS['auto'])
    frozen = s.plan.frozen_keys(0)
    trainable = sum(x.size for k, sub in self.state.params.items() if k not in frozen
                    for x in jax.tree.leaves(sub))
    stages = c.finetune.train_stages
    return dict(framework='jax', model=c.model.name, norm=getattr(s.model, 'norm', None),
                width=getattr(s.model, 'width', None),
                cifar_stem=getattr(s.model, 'cifar_stem', None),
                conv=next(name for name, fn in CONVS.items() if fn is conv_fn),
                dtype=c.model.dtype, batch=c.train.batch_size, image_size=s.image_size,
                num_classes=s.model_meta['num_classes'], freeze_depth=c.finetune.freeze_depth,
                train_stages=None if stages is None else list(stages),
                frozen_stages=list(s.plan.phases[0].frozen), trainable_params=int(trainable),
                devices=s.mesh.size, compile_s=self.compile_s,
                macs_per_image=None if self.flops['infer'] is None
                else self.flops['infer'] / 2 / c.train.batch_size,
                xla_options=self.xla_options, **machine())


def machine() -> dict:
  """The backend, accelerator kind, CPU model and core count the figures were measured on."""
  cpu = ''
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                 '')
  except OSError:
    pass
  return dict(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind, cpu=cpu,
              cores=os.cpu_count(), jax_version=jax.__version__)


########## Timing.


def times(fn, steps: int, warmup: int = 1) -> list[float]:
  """Wall seconds of `steps` calls of fn() after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def median_s(fn, steps: int, warmup: int = 1) -> float:
  return float(np.median(times(fn, steps, warmup)))


def timed(fn, *args, steps: int) -> float:
  """Median wall time of `steps` calls of jax.block_until_ready(fn(*args)) after a warm-up."""
  return median_s(lambda: jax.block_until_ready(fn(*args)), steps)


def interleaved(fns: dict, rounds: int, steps: int = 1, warmup: int = 1) -> dict:
  """name -> per-round medians: each round runs every fn in turn (`warmup` calls, then `steps`
  timed), so all see the same machine load."""
  out = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      out[name].append(median_s(fn, steps, warmup))
  return out


def matmul_ceiling(dtype='float32', n: int = 4096, steps: int = 5) -> float:
  """Achieved GFLOP/s of an n x n jnp matmul in `dtype`: one chip's practical ceiling."""
  a = jnp.ones((n, n), jnp.dtype(dtype))
  return 2 * n ** 3 / timed(jax.jit(lambda a: a @ a), a, steps=steps) / 1e9


def peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compare(args, benches: dict, suite: str, **label):
  """Times two TrainerSteps (the first is the reference) round by round, train and inference;
  reports their images/s (medians) and the median per-round speed-up of the second."""
  (ref, a), (other, b) = benches.items()
  row = dict(a.info(), suite=suite, rounds=args.steps, malloc=args.malloc, **label)
  for kind in ('train', 'infer'):
    t = interleaved({ref: getattr(a, kind), other: getattr(b, kind)}, args.steps)
    for name in (ref, other):
      row[f'{name}_{kind}_img_s'] = row['batch'] / float(np.median(t[name]))
    row[f'{kind}_speedup'] = float(np.median(np.array(t[ref]) / np.array(t[other])))
  row['peak_rss_mib'] = peak_rss_mib()
  report([row], [f'{ref}_train_img_s', f'{other}_train_img_s', 'train_speedup',
                 f'{ref}_infer_img_s', f'{other}_infer_img_s', 'infer_speedup'], args.out,
         title=f'{suite}: {row["model"]}, batch {row["batch"]}, {row["image_size"]}x'
               f'{row["image_size"]}, {args.steps} interleaved rounds')


########## Output.


def _fmt(v) -> str:
  if isinstance(v, float):
    return f'{v:,.1f}' if abs(v) >= 100 else f'{v:.3g}' if abs(v) < 0.01 and v else f'{v:.3f}'
  return '-' if v is None else str(v)


def _json_value(v):
  return float(f'{v:.6g}') if isinstance(v, float) and math.isfinite(v) else v


def report(rows: list, columns: list, out: str | None = None, title: str | None = None):
  """Prints `rows` (dicts) as a table of `columns` (keys), and appends each whole row to `out`
  as one JSON line."""
  cells = [columns] + [[_fmt(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  if title:
    print(title)
  for i, line in enumerate(cells):
    print('  '.join(cell.rjust(w) for cell, w in zip(line, widths)))
    if i == 0:
      print('  '.join('-' * w for w in widths))
  print(flush=True)
  write_jsonl(rows, out)


def write_jsonl(rows: list, out: str | None):
  """Appends each row to `out` (if set) as one JSON line."""
  if not out:
    return
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'a') as f:
    for r in rows:
      f.write(json.dumps({k: _json_value(v) for k, v in r.items()}) + '\n')
