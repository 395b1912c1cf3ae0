"""Input-pipeline throughput: images/s of `cnn_arch.input_pipeline`'s train and eval batches.

    python -m benchmarks.input [--steps=200 --repeats=5 --batch_size=128] [--out=FILE.jsonl]

Measures the default data config (`cnn_arch.config.base().data`: the embedded digits, 8x8
upscaled to 32x32, with augmentation) and cifar10-shaped data (tfds.testing.mock_data: random
32x32x3 uint8 images, encoded and decoded like the real TFRecords) through the same code path.
The first epoch (decoding into the cache) is warm-up; the train figure is the median over
--repeats of --steps batches, the eval figure the median over --repeats full eval passes.
"""

import statistics
import tempfile
import time

import tensorflow_datasets as tfds

from benchmarks import common
from cnn_arch import config as config_lib
from cnn_arch import input_pipeline


def data_config(name: str, data_dir: str | None):
  cfg = config_lib.base().data
  cfg.name, cfg.data_dir = name, data_dir
  return cfg


def measure(cfg, *, batch_size: int, steps: int, repeats: int) -> dict[str, float]:
  """Median images/s of training batches (after one warm-up epoch) and of one full eval pass."""
  info = input_pipeline.get_info(cfg)
  batches = input_pipeline.train_batches(cfg, global_batch_size=batch_size, seed=0)
  for _ in range(input_pipeline.steps_per_epoch(info, batch_size) + 1):
    next(batches)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(batches)
    rates.append(steps * batch_size / (time.perf_counter() - start))
  evals = []
  for _ in range(repeats):
    start = time.perf_counter()
    n = sum(len(b['label']) for b in input_pipeline.eval_batches(cfg, global_batch_size=batch_size))
    evals.append(n / (time.perf_counter() - start))
  return {'train_img_s': statistics.median(rates), 'eval_img_s': statistics.median(evals)}


def main(argv=None):
  p = common.parser(__doc__, __spec__.name, steps=200, model=False, xla=False)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--mock_examples', type=int, default=2048)
  p.add_argument('--data_dir', default=None, help='tfds data_dir (default: a fresh temporary one)')
  args = common.parse(p, argv)
  run = lambda name, data_dir: dict(
      suite='input', data=name, batch=args.batch_size, steps=args.steps, repeats=args.repeats,
      **measure(data_config(name, data_dir), batch_size=args.batch_size, steps=args.steps,
                repeats=args.repeats), **common.machine())
  with tempfile.TemporaryDirectory() as tmp:
    rows = [run('digits', args.data_dir or tmp)]
    with tfds.testing.mock_data(num_examples=args.mock_examples):
      rows.append(dict(run('cifar10', tmp), data='cifar10 (mock)'))
  common.report(rows, ['data', 'batch', 'train_img_s', 'eval_img_s'], args.out,
                title='input pipeline, 32x32 images')
  return rows


if __name__ == '__main__':
  main()
