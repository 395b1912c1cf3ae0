"""Features in L2 space: nearest neighbours, k-NN accuracy and a linear probe on frozen features.

    python -m experiments.features_l2 --config=configs/experiments/digits.py --out=results/

The lecture's first slide on fine-tuning: a test image and its nearest neighbours by L2 distance
in the feature space of a trained CNN (Krizhevsky et al. 2012, Fig. 4) are semantically alike.
Images are embedded with a network's pre-logit features
(`model.apply(..., features=True)[1]['pre_logits']`). Three embeddings: the source-pretrained
network (the freeze sweep's starting point), the same architecture at random initialisation, and
the raw pixels (the normalised input image flattened: the baseline any feature should beat).

Per seed in `features.seeds`, the keys are `features.per_class` labelled training images of the
target task (the seed draws them, `data.subset_seed`), and the queries are the target's whole
test split (the final number; nothing is selected on it). For each (embedding, seed) it reports
k-NN top-1 (majority vote of the k nearest keys) and the top-1 of a linear probe: an
L2-regularised multinomial logistic regression on standardised features, solved to convergence
(`linear_probe`). Writes OUT/features_l2/results.json and knn_grid.png.
"""

import os

import jax
import numpy as np
import scipy.optimize
from ml_collections import ConfigDict

from cnn_arch import checkpoint, datasets, input_pipeline, models
from experiments import common, stats

NAME = 'features_l2'
NETWORKS = ('pretrained', 'random', 'pixels')
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


def standardise(train_x, test_x) -> tuple[np.ndarray, np.ndarray]:
  """Both sets scaled by the training mean and std (constant features: std 1), in float64."""
  x, xt = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
  mean, std = x.mean(0), x.std(0)
  std = np.where(std > 0, std, 1.0)
  return (x - mean) / std, (xt - mean) / std


def probe_objective(params: np.ndarray, x: np.ndarray, y: np.ndarray, num_classes: int,
                    l2: float) -> tuple[float, np.ndarray]:
  """Mean softmax cross-entropy + l2 / 2 * ||W||^2 (bias not penalised) and its gradient.

  `params` is [W (D x C), b (C)] flattened; float64 throughout.
  """
  d = x.shape[1]
  w, b = params[:d * num_classes].reshape(d, num_classes), params[d * num_classes:]
  logits = x @ w + b
  logits -= logits.max(1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  n = len(y)
  loss = -log_p[np.arange(n), y].mean() + 0.5 * l2 * (w * w).sum()
  residual = np.exp(log_p)
  residual[np.arange(n), y] -= 1.0
  residual /= n
  grad = np.concatenate([(x.T @ residual + l2 * w).ravel(), residual.sum(0)])
  return float(loss), grad


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, *, l2: float,
                 max_iter: int = 2000, tol: float = 1e-5) -> tuple[float, float]:
  """Top-1 on (test_x, test_y) of a linear softmax classifier fitted to convergence, and the
  largest gradient component at the returned solution (the convergence check: below `tol`).

  Features are standardised with the training statistics. The objective (`probe_objective`) is
  strictly convex for l2 > 0, so its minimum is unique and independent of initialisation; it is
  solved from zero by L-BFGS-B (scipy) with the analytic gradient in float64, stopping when
  every gradient component is below `tol` (or after `max_iter` iterations).
  """
  x, xt = standardise(train_x, test_x)
  y = np.asarray(train_y, np.int64)
  res = scipy.optimize.minimize(
      probe_objective, np.zeros(x.shape[1] * num_classes + num_classes), jac=True,
      args=(x, y, num_classes, l2), method='L-BFGS-B',
      options=dict(maxiter=max_iter, maxfun=4 * max_iter, gtol=tol, ftol=0.0, maxcor=20))
  grad_norm = float(np.abs(probe_objective(res.x, x, y, num_classes, l2)[1]).max())
  d = x.shape[1]
  w, b = res.x[:d * num_classes].reshape(d, num_classes), res.x[d * num_classes:]
  pred = np.argmax(xt @ w + b, -1)
  return float((pred == np.asarray(test_y)).mean()), grad_norm


def split_arrays(data: ConfigDict, split: str, train_view: bool = False,
                 batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Every example of a split (or of its training view), preprocessed as for evaluation."""
  images, labels = [], []
  for b in input_pipeline.eval_batches(data, global_batch_size=batch, split=split,
                                       train_view=train_view):
    keep = b['mask'] > 0
    images.append(b['image'][keep])
    labels.append(b['label'][keep])
  return np.concatenate(images), np.concatenate(labels)


def embed(model, variables: dict, images: np.ndarray, batch: int = 500) -> np.ndarray:
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


def run(cfg, out: str) -> dict:
  """k-NN and probe top-1 per (network, seed); writes results.json and the neighbour grid."""
  directory = os.path.join(out, NAME)
  done = os.path.join(directory, 'results.json')
  if os.path.exists(done):
    return common.read_json(done)
  os.makedirs(directory, exist_ok=True)
  fc, data = cfg.features, cfg.target.data
  info = input_pipeline.get_info(data)
  split = datasets.test_split(data) or datasets.eval_split(data)
  test_x, test_y = split_arrays(data, split)
  variables, meta = checkpoint.load_pretrained(common.pretrained(cfg, out))
  model = models.get_model(meta['model'], num_classes=meta['num_classes'], **meta['options'])
  pretrained_test = embed(model, variables, test_x)
  pixels = lambda images: images.reshape(len(images), -1)
  rows, shown = [], None
  for seed in fc.seeds:
    view = ConfigDict(data.to_dict())
    view.per_class, view.subset_seed = fc.per_class, seed
    train_x, train_y = split_arrays(view, data.train_split, train_view=True)
    rand = models.init_variables(model, info.image_size, jax.random.PRNGKey(seed))
    feats = {'pretrained': (embed(model, variables, train_x), pretrained_test),
             'random': (embed(model, rand, train_x), embed(model, rand, test_x)),
             'pixels': (pixels(train_x), pixels(test_x))}
    neighbours = {}
    for name in NETWORKS:
      f_train, f_test = feats[name]
      idx, dist = nearest(f_test, f_train, fc.k)
      knn = float((knn_predict(idx, train_y, info.num_classes) == test_y).mean())
      probe, grad_norm = linear_probe(f_train, train_y, f_test, test_y, info.num_classes,
                                      l2=fc.probe_l2, max_iter=fc.probe_max_iter,
                                      tol=fc.probe_tol)
      rows.append(dict(network=name, seed=int(seed), knn_top1=knn, probe_top1=probe,
                       dims=int(f_train.shape[1]), k=int(fc.k), num_train=len(train_y),
                       num_test=len(test_y), split=split, probe_grad_norm=grad_norm))
      neighbours[name] = (idx[:fc.queries], dist[:fc.queries])
    if shown is None:  # the figure shows the first seed
      shown = (train_x, train_y, neighbours)
  train_x, train_y, neighbours = shown
  grid(test_x[:fc.queries], test_y[:fc.queries], train_x, train_y, neighbours, info,
       os.path.join(directory, 'knn_grid.png'))
  results = {'rows': rows}
  common.write_json(done, results)
  return results


def _by_seed(results: dict, network: str, key: str) -> dict:
  return {r['seed']: r[key] for r in results['rows'] if r['network'] == network}


def _networks(results: dict) -> list[str]:
  present = {r['network'] for r in results['rows']}
  return [n for n in NETWORKS if n in present] + sorted(present - set(NETWORKS))


def table(results: dict) -> str:
  """Markdown: per network, k-NN and probe top-1 (%) as mean [95 % CI] over the seeds."""
  rows = results['rows']
  k = rows[0]['k']
  lines = [f'| network | feature dims | {k}-NN top-1 (%) | linear probe top-1 (%) | seeds |',
           '|---|---|---|---|---|']
  for name in _networks(results):
    knn, probe = _by_seed(results, name, 'knn_top1'), _by_seed(results, name, 'probe_top1')
    dims = _by_seed(results, name, 'dims')
    lines.append(f'| {name} | {next(iter(dims.values()))} | '
                 f'{stats.mean_interval(knn.values()).format(1, 100)} | '
                 f'{stats.mean_interval(probe.values()).format(1, 100)} | {len(knn)} |')
  return '\n'.join(lines)


def findings(results: dict) -> list[str]:
  """Sentences on the paired (by seed) differences pretrained - random and pretrained - pixels,
  for k-NN and for the probe; an effect only where the 95 % interval excludes zero."""
  present = {r['network'] for r in results['rows']}
  k = results['rows'][0]['k']
  out = []
  for other, label in (('random', 'random'), ('pixels', 'raw-pixel')):
    if not {'pretrained', other} <= present:
      continue
    for key, what in (('knn_top1', f'{k}-NN'), ('probe_top1', 'linear probe')):
      interval = stats.paired_difference(_by_seed(results, 'pretrained', key),
                                         _by_seed(results, other, key),
                                         labels=('pretrained', other))
      text = stats.sentence(f'{what} on pretrained features', f'{what} on {label} features',
                            interval)
      out.append(text[0].upper() + text[1:] + '.')
  return out


def grid(queries, query_labels, keys, key_labels, shown: dict, info, path: str):
  """PNG in the style of Krizhevsky et al. (2012), Fig. 4: one panel per network, stacked.

  In each panel a row is a test image (the query, set apart by a gap and a line) and its k
  nearest training images, nearest first; a neighbour is framed green when its label is the
  query's and red otherwise, with its label and L2 distance underneath.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  k = next(iter(shown.values()))[0].shape[1]
  q = len(queries)
  s, pad, gap, left = 0.65, 0.06, 0.35, 0.1  # inches: thumbnail, between, after query, margin
  label_h, caption_h, header_h, panel_gap = 0.2, 0.5, 0.2, 0.3
  row_h = s + label_h
  panel_h = caption_h + header_h + q * row_h
  width = 2 * left + (1 + k) * s + k * pad + gap
  height = len(shown) * panel_h + (len(shown) - 1) * panel_gap + 0.1
  fig = plt.figure(figsize=(width, height))
  query_x = left
  neighbour_x = [left + s + gap + j * (s + pad) for j in range(k)]

  def thumb(x, top, image, colour):
    """Axes at (x, top) inches from the figure's top-left corner, the image in a frame."""
    ax = fig.add_axes([x / width, 1 - (top + s) / height, s / width, s / height])
    img = _display(image, info)
    f = max(1, img.shape[0] // 12)  # frame thickness in image pixels
    canvas = np.ones((img.shape[0] + 2 * f, img.shape[1] + 2 * f, 3))
    canvas[:] = matplotlib.colors.to_rgb(colour)
    canvas[f:-f, f:-f] = img
    ax.imshow(canvas, interpolation='nearest')
    ax.axis('off')
    return ax

  top = 0.05
  for name, (idx, dist) in shown.items():
    what = 'raw pixels' if name == 'pixels' else 'pre-logit features'
    noun = 'pixels baseline' if name == 'pixels' else f'{name} network'
    fig.text(left / width, 1 - (top + caption_h * 0.3) / height, f'{noun}:', fontsize=10,
             fontweight='bold', va='center')
    fig.text(left / width, 1 - (top + caption_h * 0.75) / height,
             f'{k} nearest training images (L2 on {what})', fontsize=9, va='center')
    head = top + caption_h + header_h * 0.5
    fig.text((query_x + s / 2) / width, 1 - head / height, 'query', fontsize=8,
             ha='center', va='center')
    for j, x in enumerate(neighbour_x):
      fig.text((x + s / 2) / width, 1 - head / height, f'#{j + 1}', fontsize=8, ha='center',
               va='center', color='0.3')
    line_x = (query_x + s + gap / 2) / width
    y0 = 1 - (top + caption_h) / height
    y1 = 1 - (top + panel_h) / height
    fig.add_artist(matplotlib.lines.Line2D([line_x, line_x], [y1, y0], color='0.5', lw=1))
    for r in range(q):
      row_top = top + caption_h + header_h + r * row_h
      thumb(query_x, row_top, queries[r], 'white')
      fig.text((query_x + s / 2) / width, 1 - (row_top + s + label_h * 0.45) / height,
               info.class_names[query_labels[r]], fontsize=7, ha='center', va='center')
      for j, x in enumerate(neighbour_x):
        same = key_labels[idx[r, j]] == query_labels[r]
        colour = 'tab:green' if same else 'tab:red'
        thumb(x, row_top, keys[idx[r, j]], colour)
        fig.text((x + s / 2) / width, 1 - (row_top + s + label_h * 0.45) / height,
                 f'{info.class_names[key_labels[idx[r, j]]]}  d={dist[r, j]:.1f}', fontsize=6,
                 ha='center', va='center', color=colour)
    top += panel_h + panel_gap
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _display(image: np.ndarray, info) -> np.ndarray:
  """A normalised input image back to [0, 1] RGB for display."""
  return np.clip(image * np.array(info.std) + np.array(info.mean), 0.0, 1.0)


if __name__ == '__main__':
  common.main(lambda cfg, out: print('\n'.join([table(r := run(cfg, out))] + findings(r))))
