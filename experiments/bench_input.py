"""Input-pipeline throughput: images/s of `train_batches` and `eval_batches`.

    python experiments/bench_input.py [--steps=200] [--repeats=5]

Measures the default config (embedded digits, 8x8 upscaled to 32x32, batch 128) and cifar10-shaped
data (tfds.testing.mock_data: random 32x32x3 uint8 images, encoded and decoded like the real
TFRecords) through the same code path. The first epoch (decoding into the cache) is warm-up; the
figure is the median over repeats of `steps` batches. A training step of a small CPU ResNet consumes
5-500 images/s here, so the pipeline needs >= 2,500 images/s to stay out of the way.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import ml_collections
import tensorflow_datasets as tfds

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cnn_arch import input_pipeline  # pylint: disable=g-import-not-at-top


def data_config(name: str, data_dir: str | None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=data_dir, folder=None, train_split='train', eval_split='test',
      image_size=None, mean=None, std=None, augment=True, classes=None, per_class=None,
      fraction=None, shuffle_buffer=10_000, cache=True))


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
  return {'train': statistics.median(rates), 'eval': statistics.median(evals)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--mock_examples', type=int, default=2048)
  args = parser.parse_args(argv)
  run = lambda cfg: measure(cfg, batch_size=args.batch_size, steps=args.steps,
                            repeats=args.repeats)
  with tempfile.TemporaryDirectory() as tmp:
    results = {'digits 32x32': run(data_config('digits', tmp))}
    with tfds.testing.mock_data(num_examples=args.mock_examples):
      results['cifar10-shaped (mock) 32x32'] = run(data_config('cifar10', tmp))
  for name, r in results.items():
    print(f'{name:30s} batch {args.batch_size}: train {r["train"]:8.0f} images/s, '
          f'eval {r["eval"]:8.0f} images/s')
  return results


if __name__ == '__main__':
  main()
