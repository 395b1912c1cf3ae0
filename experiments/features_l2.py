"""Features in L2 space: nearest neighbours, k-NN accuracy and a linear probe on frozen features.

    python -m experiments.features_l2 --config=configs/experiments/digits.py --out=results/

The lecture's first slide on fine-tuning: a test image and its nearest neighbours by L2 distance
in the feature space of a trained CNN (Krizhevsky et al. 2012, Fig. 4) are semantically alike.
Each test image of the target task is embedded with a network's pre-logit features
(`model.apply(..., features=True)[1]['pre_logits']`) and compared with every training image.
Two networks: the source-pretrained one (the freeze sweep's starting point) and the same
architecture at random initialisation. Reports k-NN top-1 (majority vote of the k nearest) and a
linear probe's top-1: the features are computed once, and only a linear softmax classifier is
trained on them (full-batch Adam, one compiled `lax.scan`). Writes OUT/features_l2/results.json
and knn_grid.png.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from cnn_arch import checkpoint, datasets, input_pipeline, models
from experiments import common

NAME = 'features_l2'
_EMBED = {}  # model -> jitted pre-logit embedding


def squared_distances(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
  """[Q, K] squared L2 distances, ||q||^2 - 2 q.k + ||k||^2 in float64 (clipped at 0)."""
  q, k = np.asarray(queries, np.float64), np.asarray(keys, np.float64)
  d = (q * q).sum(1)[:, None] - 2.0 * q @ k.T + (k * k).sum(1)[None, :]
  return np.maximum(d, 0.0)


def nearest(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices [Q, k] of each query's k nearest keys, nearest first, and their L2 distances.

  Ties go to the lower key index (a stable sort), so results are deterministic.
  """
  if not 1 <= k <= len(keys):
    raise ValueError(f'k={k} must be between 1 and the number of keys ({len(keys)}).')
  d = squared_distances(queries, keys)
  idx = np.argsort(d, axis=1, kind='stable')[:, :k]
  return idx, np.sqrt(np.take_along_axis(d, idx, axis=1))


def knn_predict(neighbours: np.ndarray, key_labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Majority label among each row of neighbour indices (nearest first).

  A tie between classes goes to the one whose first occurrence is nearest.
  """
  labels = np.asarray(key_labels)[neighbours]  # [Q, k]
  votes = np.zeros((len(labels), num_classes), np.int64)
  np.add.at(votes, (np.arange(len(labels))[:, None], labels), 1)
  rank = np.full((len(labels), num_classes), labels.shape[1], np.int64)
  for j in range(labels.shape[1] - 1, -1, -1):  # leaves the nearest occurrence of each class
    rank[np.arange(len(labels)), labels[:, j]] = j
  # More votes always wins (a vote is worth more than any rank difference), then the nearer.
  score = votes * (labels.shape[1] + 1) - rank
  return np.argmax(score, axis=1)


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, steps: int, lr: float,
                 seed: int = 0) -> float:
  """Top-1 of a softmax classifier trained (full batch, Adam) on fixed features."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # the probe sees standardised features
  x, xt = (jnp.asarray((a - mean) / std, jnp.float32) for a in (train_x, test_x))
  y = jnp.asarray(train_y)
  tx = optax.adam(lr)
  w = {'w': 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (x.shape[1], num_classes)),
       'b': jnp.zeros(num_classes)}

  def loss(p):
    logits = x @ p['w'] + p['b']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss)(p)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

  p = fit(w)
  pred = np.asarray(jnp.argmax(xt @ p['w'] + p['b'], -1))
  return float((pred == np.asarray(test_y)).mean())


def split_arrays(data: ConfigDict, split: str, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a split of the data view, preprocessed as for evaluation (no augment)."""
  images, labels = [], []
  for b in input_pipeline.eval_batches(data, global_batch_size=batch, split=split):
    keep = b['mask'] > 0
    images.append(b['image'][keep])
    labels.append(b['label'][keep])
  return np.concatenate(images), np.concatenate(labels)


def embed(model, variables: dict, images: np.ndarray, batch: int = 256) -> np.ndarray:
  """Pre-logit features [N, D] of `images` in inference mode (fixed batch: one compile)."""
  fn = _EMBED.setdefault(model, jax.jit(
      lambda v, x: model.apply(v, x, train=False, features=True)[1]['pre_logits']))
  out = []
  for i in range(0, len(images), batch):
    chunk = images[i:i + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:],
                                              chunk.dtype)])
    out.append(np.asarray(fn(variables, padded))[:len(chunk)])
  return np.concatenate(out)


def networks(cfg, out: str, image_size: int) -> dict[str, tuple]:
  """{'pretrained': (model, variables), 'random': (model, variables)}."""
  variables, meta = checkpoint.load_pretrained(common.pretrained(cfg, out))
  model = models.get_model(meta['model'], num_classes=meta['num_classes'], **meta['options'])
  rand = models.init_variables(model, image_size, jax.random.PRNGKey(cfg.features.seed))
  return {'pretrained': (model, variables), 'random': (model, rand)}


def run(cfg, out: str) -> dict:
  """Embeds the target data with each network; writes results.json and the neighbour grid."""
  directory = os.path.join(out, NAME)
  done = os.path.join(directory, 'results.json')
  if os.path.exists(done):
    return common.read_json(done)
  os.makedirs(directory, exist_ok=True)
  data = cfg.target.data
  info = input_pipeline.get_info(data)
  train_x, train_y = split_arrays(data, data.train_split)
  test_x, test_y = split_arrays(data, datasets.eval_split(data))
  fc = cfg.features
  results, shown = {}, {}
  for name, (model, variables) in networks(cfg, out, info.image_size).items():
    f_train, f_test = embed(model, variables, train_x), embed(model, variables, test_x)
    idx, dist = nearest(f_test, f_train, fc.k)
    knn = float((knn_predict(idx, train_y, info.num_classes) == test_y).mean())
    probe = linear_probe(f_train, train_y, f_test, test_y, info.num_classes,
                         steps=fc.probe_steps, lr=fc.probe_lr, seed=fc.seed)
    results[name] = dict(knn_top1=knn, probe_top1=probe, dims=int(f_train.shape[1]), k=fc.k,
                         num_train=len(train_y), num_test=len(test_y))
    shown[name] = (idx[:fc.queries], dist[:fc.queries])
  grid(test_x[:fc.queries], test_y[:fc.queries], train_x, train_y, shown, info,
       os.path.join(directory, 'knn_grid.png'))
  common.write_json(done, results)
  return results


def table(results: dict) -> str:
  k = next(iter(results.values()))['k']
  lines = [f'| network | feature dims | {k}-NN top-1 (%) | linear probe top-1 (%) |',
           '|---|---|---|---|']
  for name, r in results.items():
    lines.append(f'| {name} | {r["dims"]} | {100 * r["knn_top1"]:.1f} | '
                 f'{100 * r["probe_top1"]:.1f} |')
  return '\n'.join(lines)


def finding(results: dict) -> str:
  """Whether pretrained features beat random ones, for k-NN and for the probe, in words."""
  if not {'pretrained', 'random'} <= set(results):
    return ''
  p, r = results['pretrained'], results['random']
  parts = []
  for key, what in (('knn_top1', f'{p["k"]}-NN'), ('probe_top1', 'the linear probe')):
    diff = 100 * (p[key] - r[key])
    parts.append(f'{what} is {abs(diff):.1f} points {"better" if diff > 0 else "worse"} with '
                 'pretrained than with random features')
  text = '; '.join(parts)
  return text[0].upper() + text[1:] + '.'


def grid(queries, query_labels, keys, key_labels, shown: dict, info, path: str):
  """PNG: each row a test image, then its nearest training images under each network.

  Neighbour titles give label and L2 distance, green when the label matches the query's.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  k = next(iter(shown.values()))[0].shape[1]
  cols = 1 + len(shown) * k
  fig, axes = plt.subplots(len(queries), cols, figsize=(cols * 0.9, len(queries) * 1.0),
                           squeeze=False)
  show = lambda ax, img: ax.imshow(_display(img, info))
  for r in range(len(queries)):
    show(axes[r][0], queries[r])
    axes[r][0].set_title(f'query {info.class_names[query_labels[r]]}', fontsize=6)
    for n, (name, (idx, dist)) in enumerate(shown.items()):
      for j in range(k):
        ax = axes[r][1 + n * k + j]
        show(ax, keys[idx[r, j]])
        same = key_labels[idx[r, j]] == query_labels[r]
        ax.set_title(f'{info.class_names[key_labels[idx[r, j]]]} {dist[r, j]:.1f}', fontsize=6,
                     color='green' if same else 'red')
        if r == 0 and j == 0:
          ax.text(0, -0.9, name, transform=ax.transAxes, fontsize=7)
  for ax in axes.flat:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _display(image: np.ndarray, info) -> np.ndarray:
  """A normalised input image back to [0, 1] RGB for display."""
  return np.clip(image * np.array(info.std) + np.array(info.mean), 0.0, 1.0)


if __name__ == '__main__':
  common.main(lambda cfg, out: print(table(run(cfg, out))))
