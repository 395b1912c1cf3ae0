"""A formula-driven pretraining source: `fractaldb`, images of random iterated function systems.

After Kataoka et al. (ACCV 2020, "Pre-training without Natural Images"): each class is one random
affine iterated function system (IFS) of 2-4 maps, drawn with the chaos game; a class's instances
are the same system with jittered parameters and random flips. The systems are sampled as in
Anderson & Farrell (WACV 2022, "Improving Fractal Pre-training"): each map is
A = R(theta) diag(s1, s2) diag(+-1, +-1) R(phi) with singular values s2 <= s1 < 1, so every map
is a contraction and the attractor exists, and the maps' "sigma factor" sum(s1 + 2 s2) is drawn
from U((5 + n) / 2, (6 + n) / 2) for n maps, the range they found to give shapes that are neither
dust nor blobs. Each map is chosen with probability proportional to |det A|, its share of the
attractor's area. Like FractalDB's filling-rate filter, systems whose attractor covers less than
`MIN_FILL` of the image are redrawn.

Images are grey levels (log of the chaos game's point count per pixel), uint8 (S, S, 1), the
attractor scaled to fit the image with its aspect kept. Everything follows from `seed`: the same
config gives the same arrays on every machine. Generation is vectorised over instances (all
walkers of a batch step together), under a second per 1,000 32x32 images on one CPU core.

Splits: within each class, the first 80 % of instances are `train`, the next 10 % `validation`,
the last 10 % `test`; the default config `c10_m600_s32` (10 classes x 600 instances, 32x32) has
4,800 / 600 / 600 examples, 480 / 60 / 60 per class. `id` is the instance's index in `generate`'s
order (class-major). Configs: `fractaldb/c10_m600_s32` (default), `fractaldb/c100_m100_s32`,
`fractaldb/c10_m60_s32` (smoke tests); `Fractaldb(config=FractaldbConfig(...))` builds any other.
`python -m cnn_arch.fractaldb --out grid.png` draws a grid of samples.
"""

import argparse
import dataclasses

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

MAX_MAPS = 4
MIN_MAPS = 2
SIGMA_MAX = 0.98  # Strictly below 1 so every map contracts.
MIN_FILL = 0.15  # Fraction of pixels the base system must cover (rejects dust and lines).
# Instance jitter: small enough that a class keeps its shape, large enough that instances differ.
ANGLE_JITTER, SIGMA_JITTER, SHIFT_JITTER = 0.08, 0.04, 0.08
WALKERS, BURN_IN, STEPS = 128, 8, 64  # 128 x 64 = 8,192 points per image.
CHUNK = 256  # Instances per chaos-game batch: bounds memory (~20 MB) independently of the config.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, validation, test


def sample_sigmas(rng: np.random.Generator, n: int, alpha: float) -> np.ndarray:
  """n pairs s1 >= s2 in [0, SIGMA_MAX) with sum(s1 + 2 s2) = alpha, shape (n, 2)."""
  top = 3 * SIGMA_MAX  # The largest weight s1 + 2 s2 one map can carry.
  weights = np.empty(n)
  left = alpha
  for i in range(n - 1):  # Leave enough, but not more than the remaining maps can carry.
    weights[i] = rng.uniform(max(0.0, left - top * (n - 1 - i)), min(top, left))
    left -= weights[i]
  weights[-1] = left
  weights = rng.permutation(weights)  # The last map would otherwise take the remainder.
  s2 = rng.uniform(np.maximum(0.0, (weights - SIGMA_MAX) / 2), weights / 3)
  return np.stack([weights - 2 * s2, s2], axis=1)


def sample_system(rng: np.random.Generator) -> dict[str, np.ndarray]:
  """One class: n maps' rotation angles, singular values, reflection signs and shifts."""
  n = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
  alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
  return {'theta': rng.uniform(-np.pi, np.pi, n), 'phi': rng.uniform(-np.pi, np.pi, n),
          'sigma': sample_sigmas(rng, n, alpha), 'sign': rng.choice([-1.0, 1.0], (n, 2)),
          'shift': rng.uniform(-1, 1, (n, 2))}


def _rotation(angle: np.ndarray) -> np.ndarray:
  c, s = np.cos(angle), np.sin(angle)
  return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def maps_of(system: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(A [..., MAX_MAPS, 2, 2], b [..., MAX_MAPS, 2], p [..., MAX_MAPS]); padding has p = 0."""
  diag = system['sigma'] * system['sign']
  a = _rotation(system['theta']) @ (diag[..., :, None] * _rotation(system['phi']))
  p = np.abs(np.linalg.det(a))
  pad = MAX_MAPS - a.shape[-3]
  widths = [(0, 0)] * (a.ndim - 3) + [(0, pad)]
  return (np.pad(a, widths + [(0, 0), (0, 0)]), np.pad(system['shift'], widths + [(0, 0)]),
          np.pad(p / p.sum(-1, keepdims=True), widths))


def jitter(rng: np.random.Generator, system: dict[str, np.ndarray], m: int) -> dict:
  """m instances of a class: its parameters perturbed, singular values kept below SIGMA_MAX."""
  n = len(system['theta'])
  return {'theta': system['theta'] + rng.normal(0, ANGLE_JITTER, (m, n)),
          'phi': system['phi'] + rng.normal(0, ANGLE_JITTER, (m, n)),
          'sigma': np.minimum(system['sigma'] * np.exp(rng.normal(0, SIGMA_JITTER, (m, n, 2))),
                              SIGMA_MAX),
          'sign': np.broadcast_to(system['sign'], (m, n, 2)),
          'shift': system['shift'] + rng.normal(0, SHIFT_JITTER, (m, n, 2))}


def render(rng: np.random.Generator, a: np.ndarray, b: np.ndarray, p: np.ndarray,
           size: int) -> np.ndarray:
  """Chaos game for K systems at once: uint8 images (K, size, size)."""
  k = len(a)
  # Start every walker at map 0's fixed point, which lies on the attractor, so burn-in only
  # has to decorrelate the walkers, not to converge.
  start = np.linalg.solve(np.eye(2) - a[:, 0], b[:, 0, :, None])[..., 0].astype(np.float32)
  x, y = (np.repeat(start[:, i:i + 1], WALKERS, 1) for i in range(2))
  # Thresholds between maps; past the last real map they are 2 (> any uniform draw), so
  # rounding in the cumulative sum can never select a padding map.
  last = (p > 0).sum(-1, keepdims=True) - 1
  cum = np.where(np.arange(MAX_MAPS) >= last, 2.0, np.cumsum(p, -1)).astype(np.float32)
  # One row of 6 coefficients per (system, map), gathered by a flat index: much faster than
  # indexing the (K, MAX_MAPS, 2, 2) array with two index arrays.
  coef = np.concatenate([a.reshape(k, MAX_MAPS, 4), b], -1).reshape(k * MAX_MAPS, 6)
  coef = coef.astype(np.float32)
  base = (np.arange(k) * MAX_MAPS)[:, None]
  xs, ys = np.empty((2, STEPS, k, WALKERS), np.float32)
  for t in range(BURN_IN + STEPS):
    u = rng.random((k, WALKERS), np.float32)
    which = base + sum((u >= cum[:, j:j + 1]) for j in range(MAX_MAPS - 1))
    c = coef[which]
    x, y = c[..., 0] * x + c[..., 1] * y + c[..., 4], c[..., 2] * x + c[..., 3] * y + c[..., 5]
    if t >= BURN_IN:
      xs[t - BURN_IN], ys[t - BURN_IN] = x, y
  low = np.stack([xs.min((0, 2)), ys.min((0, 2))], -1)
  high = np.stack([xs.max((0, 2)), ys.max((0, 2))], -1)
  scale = (size - 1) / np.maximum((high - low).max(-1), 1e-6)
  centre = (low + high) / 2
  # Centre the attractor, aspect kept: the shape is what identifies a class.
  col, row = ((v - centre[:, i, None]) * scale[:, None] + (size - 1) / 2 for i, v in
              enumerate((xs, ys)))
  col, row = (np.clip(np.round(v), 0, size - 1).astype(np.int64) for v in (col, row))
  flat = np.arange(k)[:, None] * size * size + row * size + col
  counts = np.bincount(flat.ravel(), minlength=k * size * size).reshape(k, size, size)
  grey = np.log1p(counts) / np.log1p(counts.max((1, 2), keepdims=True))
  return np.round(255 * grey).astype(np.uint8)


def class_systems(classes: int, size: int, seed: int) -> list[dict[str, np.ndarray]]:
  """`classes` systems, each redrawn until its attractor fills at least MIN_FILL of the image."""
  systems = []
  for c in range(classes):
    rng = np.random.default_rng([seed, 0, c])
    while True:
      system = sample_system(rng)
      image = render(rng, *(x[None] for x in maps_of(system)), size)
      if (image > 0).mean() >= MIN_FILL:
        systems.append(system)
        break
  return systems


def instance_maps(classes: int, instances: int, size: int, seed: int):
  """Per instance (class-major): A (N, MAX_MAPS, 2, 2), b, p, and labels (N,)."""
  parts = []
  for c, system in enumerate(class_systems(classes, size, seed)):
    parts.append(maps_of(jitter(np.random.default_rng([seed, 1, c]), system, instances)))
  a, b, p = (np.concatenate(x) for x in zip(*parts))
  return a, b, p, np.repeat(np.arange(classes), instances)


def generate(classes: int = 10, instances: int = 600, size: int = 32,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, size, size, 1), int64 labels (N,)), N = classes * instances."""
  a, b, p, labels = instance_maps(classes, instances, size, seed)
  images = np.empty((len(labels), size, size), np.uint8)
  for start in range(0, len(labels), CHUNK):
    stop = min(start + CHUNK, len(labels))
    images[start:stop] = render(np.random.default_rng([seed, 2, start]), a[start:stop],
                                b[start:stop], p[start:stop], size)
  flips = np.random.default_rng([seed, 3]).random((len(labels), 2)) < 0.5
  images[flips[:, 0]] = images[flips[:, 0], :, ::-1]
  images[flips[:, 1]] = images[flips[:, 1], ::-1, :]
  return images[..., None], labels


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Within each class, by instance order: the first 80 % train, 10 % validation, 10 % test."""
  parts = {'train': [], 'validation': [], 'test': []}
  for c in range(int(labels.max()) + 1):
    members = np.flatnonzero(labels == c)
    n_train = int(round(SPLIT_FRACTIONS[0] * len(members)))
    n_val = int(round(SPLIT_FRACTIONS[1] * len(members)))
    parts['train'].append(members[:n_train])
    parts['validation'].append(members[n_train:n_train + n_val])
    parts['test'].append(members[n_train + n_val:])
  return {name: np.concatenate(p) for name, p in parts.items()}


def save_grid(images: np.ndarray, labels: np.ndarray, path: str, per_class: int = 8,
              max_classes: int = 10) -> None:
  """A PNG with one row per class (its first `per_class` instances), labelled on the left."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  classes = np.unique(labels)[:max_classes]
  fig, axes = plt.subplots(len(classes), per_class, squeeze=False,
                           figsize=(0.9 * per_class + 0.9, 0.9 * len(classes) + 0.5))
  for row, c in zip(axes, classes):
    members = np.flatnonzero(labels == c)[:per_class]
    for ax, i in zip(row, members):
      ax.imshow(images[i, ..., 0], cmap='gray', vmin=0, vmax=255, interpolation='nearest')
    for ax in row:
      ax.set_xticks([])
      ax.set_yticks([])
    row[0].set_ylabel(f'class {c}', rotation=0, ha='right', va='center', fontsize=11)
  fig.suptitle(f'fractaldb: {per_class} instances of each of {len(classes)} classes '
               f'({images.shape[1]}x{images.shape[2]})', fontsize=12)
  fig.tight_layout(rect=(0, 0, 1, 0.97), pad=0.3, h_pad=0.2, w_pad=0.2)
  fig.savefig(path, dpi=100)
  plt.close(fig)


@dataclasses.dataclass(eq=False)
class FractaldbConfig(tfds.core.BuilderConfig):
  classes: int = 10
  instances: int = 600
  image_size: int = 32
  seed: int = 0


def config(classes: int, instances: int, image_size: int = 32, seed: int = 0) -> FractaldbConfig:
  name = f'c{classes}_m{instances}_s{image_size}' + (f'_seed{seed}' if seed else '')
  return FractaldbConfig(name=name, classes=classes, instances=instances,
                         image_size=image_size, seed=seed,
                         description=f'{classes} IFS classes x {instances} instances, '
                                     f'{image_size}x{image_size}, seed {seed}.')


class Fractaldb(tfds.core.GeneratorBasedBuilder):
  """Random contractive IFS fractals, generated with numpy (no network, no files)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Sigma-factor IFS sampling, chaos-game grey levels, 80/10/10 splits.'}
  BUILDER_CONFIGS = [config(10, 600), config(100, 100), config(10, 60)]
  # tfds 4.9.10 finds a builder's source through `importlib_resources`; name the file directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size, classes = self.builder_config.image_size, self.builder_config.classes
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(size, size, 1)),
            'label': tfds.features.ClassLabel(num_classes=classes),
            'id': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://hirokatsukataoka16.github.io/Pretraining-without-Natural-Images/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Generated from the seed.
    cfg = self.builder_config
    images, labels = generate(cfg.classes, cfg.instances, cfg.image_size, cfg.seed)
    return {name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices(labels).items()}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': labels[i], 'id': np.int32(i)}


def builder_config(name: str) -> FractaldbConfig:
  """The config of a dataset name: 'fractaldb' (the default, c10_m600_s32) or 'fractaldb/NAME'."""
  configs = {c.name: c for c in Fractaldb.BUILDER_CONFIGS}
  key = name.partition('/')[2] or Fractaldb.BUILDER_CONFIGS[0].name
  if key not in configs:
    raise ValueError(f'Unknown fractaldb config {key!r}; choose one of {sorted(configs)}.')
  return configs[key]


def main():
  parser = argparse.ArgumentParser(description='Draw a grid of fractaldb samples.')
  parser.add_argument('--out', default='fractaldb_grid.png')
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--instances', type=int, default=600, help='as in the dataset drawn from')
  parser.add_argument('--per_class', type=int, default=8)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  # The whole config, not just per_class instances: jitter draws depend on the instance count, so
  # only this shows the dataset's own first examples.
  images, labels = generate(args.classes, args.instances, args.size, args.seed)
  save_grid(images, labels, args.out, per_class=args.per_class, max_classes=args.classes)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
