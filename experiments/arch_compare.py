"""Architecture comparison: parameters, MACs, measured speed and accuracy of each CNN family.

    python -m experiments.arch_compare --config=configs/experiments/digits.py --out=results/

AlexNet (Krizhevsky et al. 2012), VGG (Simonyan & Zisserman 2015), GoogLeNet (Szegedy et al.
2015), ResNet (He et al. 2016), ResNeXt (Xie et al. 2017) and a GroupNorm ResNet (Wu & He 2018),
all at the same reduced width, trained from scratch with the same schedule on the same task
(MNIST, 200 images per class, selected on validation, reported on the 10,000 test images).
Parameters and MACs come from `cnn_arch.summary.analyze`; images/s are medians over rounds in
which every model's train and eval steps (the very steps the runs used) take turns
(`benchmarks.common.interleaved`), on this machine.
The lecture claims ResNeXt is 1.5-2x slower than ResNet at equal MACs because grouped
convolutions are poorly optimised; `resnext_finding` states what this machine shows.
Writes OUT/arch_compare/rows.jsonl (and speed.json, the timings).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from cnn_arch import config as config_lib
from cnn_arch import summary
from cnn_arch.train_setup import make_setup
from benchmarks.common import interleaved
from experiments import common

NAME = 'arch_compare'


def trainer_config(cfg, name: str, options: dict) -> ConfigDict:
  """The trainer config of one family: shared width, data, batch, steps; `options` override
  them (image_size, lr, batch_size) or are model options."""
  options = dict(options)
  c = config_lib.base()
  c.seed = cfg.arch.seed
  c.model.name = name
  c.data = ConfigDict(cfg.arch.data.to_dict())
  c.data.image_size = options.pop('image_size', cfg.arch.image_size)
  c.optim.learning_rate = options.pop('lr', cfg.target.optim.learning_rate)
  c.train.batch_size = options.pop('batch_size', cfg.arch.batch_size)
  c.model.options = ConfigDict({'width': cfg.arch.width, 'cifar_stem': True, **options})
  c.train.eval_batch_size = cfg.target.train.eval_batch_size
  return common.steps_for(c, cfg.arch.steps)


def label(name: str, options: dict) -> str:
  """The model's row name: registry name plus the options that differ from the shared ones."""
  extra = ','.join(f'{k}={v}' for k, v in sorted(options.items()) if k != 'image_size')
  return f'{name}' + (f'[{extra}]' if extra else '')


def _steps(config: ConfigDict):
  """Params, MACs and input facts of one model, and its trainer's train and inference steps as
  no-argument callables on a fixed batch (each train call on a fresh copy of the state, which
  the step donates)."""
  s = make_setup(config)
  size, batch = s.image_size, config.train.batch_size
  report = summary.analyze(s.model, (1, size, size, 3))
  step_fn, eval_fn = common.programs(s, config)
  state = common.init_state(s, config)
  data = jax.device_put({'image': jnp.zeros((batch, size, size, 3)),
                         'label': jnp.zeros((batch,), jnp.int32),
                         'mask': jnp.ones((batch,))}, s.batch_sharding)
  images = {k: data[k] for k in ('image', 'label')}
  facts = dict(params=report['total_params'], macs=report['total_macs'], image_size=size,
               batch=batch, backend=jax.default_backend())
  return facts, {
      'train': lambda: jax.block_until_ready(step_fn(jax.tree.map(jnp.copy, state), images)),
      'infer': lambda: jax.block_until_ready(eval_fn(state, data))}


def measure(configs: dict, rounds: int) -> dict:
  """name -> params, MACs and median train/inference images/s of the trainer's steps.

  The models take turns (`benchmarks.common.interleaved`, one warm-up and one timed call of
  each per round), so all see the same machine load, also while another process shares the
  machine."""
  facts, fns = {}, {}
  for name, config in configs.items():
    facts[name], steps = _steps(config)
    fns.update({(name, kind): fn for kind, fn in steps.items()})
  seconds = interleaved(fns, rounds)
  return {name: {**f, **{f'{kind}_img_s': f['batch'] / float(np.median(seconds[name, kind]))
                         for kind in ('train', 'infer')}}
          for name, f in facts.items()}


def _options(options) -> tuple[dict, bool]:
  """A `cfg.arch.models` entry's options without `train`, and whether the model is trained."""
  options = dict(options)
  return options, options.pop('train', True)


def _models(cfg, out: str):
  """(family, trainer config, workdir, model label, trained?) of every model of
  `cfg.arch.models`."""
  for family, name, options in cfg.arch.models:
    options, trained = _options(options)
    workdir = os.path.join(out, NAME, 'runs', label(name, options).replace('=', '-'))
    yield family, trainer_config(cfg, name, options), workdir, label(name, options), trained


def train(cfg, out: str) -> dict[str, dict]:
  """Trains every model that is not timed only (or finds it trained); model label -> row."""
  rows = {}
  for family, config, workdir, model, trained in common.progress(list(_models(cfg, out)), NAME):
    row = dict(family=family, model=model, width=config.model.options.width)
    if trained:
      result = common.run(config, workdir, eval_at=(0.75, 1.0))
      curve = [m['top1'] for m in common.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
               if m['split'] == 'eval']
      row.update(top1=result['test_top1'], val_top1=result['top1'], epochs=result['epochs'],
                 val_curve=curve)
    rows[model] = row
  return rows


def time_all(cfg, out: str) -> dict[str, dict]:
  """Times every model together (or reads OUT/arch_compare/speed.json); label -> speed."""
  speed_file = os.path.join(out, NAME, 'speed.json')
  if not os.path.exists(speed_file):
    configs = {model: config for _, config, _, model, _ in _models(cfg, out)}
    common.write_json(speed_file, measure(configs, cfg.arch.timed_rounds))
  return common.read_json(speed_file)


def run(cfg, out: str) -> list[dict]:
  """Trains, times and writes the rows (OUT/arch_compare/rows.jsonl)."""
  rows, speed = train(cfg, out), time_all(cfg, out)
  rows = [{**row, **speed[model]} for model, row in rows.items()]
  common.write_jsonl(os.path.join(out, NAME, 'rows.jsonl'), rows)
  return rows


def parts(cfg) -> list[tuple[str, object, object]]:
  """`run`'s work as independent tasks for `run_all`: each trained model, then the timing (last,
  so that it finds the trained models' programs in the compilation cache)."""
  out = []
  for entry in cfg.arch.models:
    options, trained = _options(entry[2])
    if trained:
      part = ConfigDict(cfg.to_dict())
      part.arch.models = (entry,)
      out.append((label(entry[1], options), train, part))
  return out + [('timing', time_all, cfg)]


def table(rows: list[dict]) -> str:
  """Markdown table; GMAC/s = forward MACs x images/s (what the hardware achieves).

  `val gain, last quarter`: validation top-1 at the end minus at the previous evaluation (3/4
  of the run), the distance still moving; near 0 means the model is near its plateau.
  """
  lines = ['| family | model | width | input | params | MACs/image | train img/s | '
           'infer img/s | infer GMAC/s | epochs | val gain, last quarter (points) | '
           'test top-1 (%) |', '|---' * 12 + '|']
  for r in rows:
    if 'top1' in r:
      curve = r['val_curve']
      gain = f'{100 * (curve[-1] - curve[-2]):+.1f}' if len(curve) > 1 else '–'
      trained = f'{r["epochs"]:.1f} | {gain} | {100 * r["top1"]:.1f}'
    else:
      trained = 'timed only | – | –'
    lines.append(
        f'| {r["family"]} | {r["model"]} | {r["width"]} | {r["image_size"]}² | '
        f'{r["params"] / 1e6:.3f}M | {r["macs"] / 1e6:.2f}M | {r["train_img_s"]:.0f} | '
        f'{r["infer_img_s"]:.0f} | {r["infer_img_s"] * r["macs"] / 1e9:.2f} | {trained} |')
  return '\n'.join(lines)


def resnext_finding(rows: list[dict]) -> str:
  """Time per MAC of ResNeXt relative to the plain ResNet of the same depth and width, in words."""
  by_name = {(r['model'].split('[')[0], r['width']): r for r in rows}
  depths = (('resnext50_32x4d', 'resnet50'), ('resnext101_32x8d', 'resnet101'))
  pairs = [(x, r, w) for x, r in depths
           for name, w in by_name if name == x and (r, w) in by_name]
  if not pairs:
    return 'No ResNeXt/ResNet pair of equal depth and width was measured.'
  name_x, name_r, width = pairs[0]
  x, r = by_name[name_x, width], by_name[name_r, width]
  per_mac = {k: (x['macs'] / x[k]) / (r['macs'] / r[k]) for k in ('train_img_s', 'infer_img_s')}
  verdict = 'slower' if min(per_mac.values()) > 1.0 else 'not slower'
  if all(1.5 <= v <= 2.0 for v in per_mac.values()):
    lecture = 'the lecture\'s 1.5-2x holds'
  elif all(v > 2.0 for v in per_mac.values()):
    lecture = 'that is more than the lecture\'s 1.5-2x'
  elif all(v < 1.5 for v in per_mac.values()):
    lecture = 'that is less than the lecture\'s 1.5-2x'
  else:
    lecture = 'the lecture\'s 1.5-2x does not hold for both'
  return (f'At width {width}, {name_x} has {x["macs"] / r["macs"]:.2f}x the MACs of {name_r}; '
          f'per MAC it takes {per_mac["train_img_s"]:.2f}x the training time and '
          f'{per_mac["infer_img_s"]:.2f}x the inference time of {name_r} on this machine '
          f'({x.get("backend", "?")}), so ResNeXt is {verdict} at equal MACs here; {lecture} on '
          'this machine.')


if __name__ == '__main__':
  common.main(lambda cfg, out: print(table(run(cfg, out)) + '\n\n' + resnext_finding(
      common.read_jsonl(os.path.join(out, NAME, 'rows.jsonl')))))
