"""Frozen-prefix feature caching: train the unfrozen stages on stored outputs of the frozen ones.

With the first k stages frozen and augmentation off, every example meets the same frozen
function in every epoch: frozen stages run in inference mode (BatchNorm's running statistics, no
dropout, `common.run_stages`). So the trainer runs them once over the training and evaluation
data, keeps their outputs in host memory, and steps only the stages after them
(`model.apply(..., start=k)`). A linear probe on fixed features (Yosinski et al., 2014, "How
transferable are features in deep neural networks?") then costs one forward pass over the data
plus the head, and every deeper freeze-sweep point gets cheaper by its frozen share.

The stream of examples (order, batches, resumption) is the trainer's own: `train_batches` yields
example indices and this module swaps in their features, so a cached run takes the same steps as
an uncached one, to float32 rounding. The cache is rebuilt (one forward pass) each time a run
starts or resumes; it is never written to disk.
"""

import dataclasses
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from cnn_arch import input_pipeline

def plan(config: ConfigDict, model, info, ft_plan) -> tuple[int, int]:
  """(stages to cache, bytes of host memory they take); (0, 0) when the run does not cache.

  The cached stages are the prefix that the fine-tuning plan `ft_plan` freezes in every phase.
  Raises a ValueError naming the fix when finetune.cache_features='on' cannot be honoured.
  """
  mode, depth = config.finetune.cache_features, ft_plan.cached_prefix
  stage_names = ft_plan.stage_names
  if mode == 'off':
    return 0, 0
  reasons = []
  if depth == 0:
    reasons.append('the first stage trains (in some phase), so no stage is frozen under the '
                   'trained ones; freeze a prefix, e.g. finetune.freeze_depth=k >= 1')
  if config.data.augment:
    reasons.append('data.augment is True, so a frozen stage sees new images every epoch; set '
                   'data.augment=False')
  size = 0
  if not reasons:
    per_example = example_bytes(model, stage_names[depth - 1], info.image_size)
    hosts = jax.process_count()
    size = per_example * (-(-info.num_train // hosts) + -(-info.num_eval // hosts))
    limit = config.finetune.cache_max_mb * 2**20
    if size > limit:
      reasons.append(f'the features of {stage_names[depth - 1]} take {size / 2**20:.0f} MiB '
                     f'per host, over finetune.cache_max_mb={config.finetune.cache_max_mb}; '
                     'raise it or freeze more stages')
  if reasons and mode == 'on':
    raise ValueError('finetune.cache_features=on cannot cache: ' + '; '.join(reasons) +
                     ' (or set finetune.cache_features=auto).')
  return (0, 0) if reasons else (depth, size)


def example_bytes(model, stage: str, image_size: int) -> int:
  """Bytes of one example's output of `stage`, from shapes alone (nothing is computed)."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)

  def features(x):
    variables = model.init({'params': jax.random.PRNGKey(0)}, x, train=False)
    return model.apply(variables, x, train=False, features=True)[1][stage]
  out = jax.eval_shape(features, x)
  return int(np.prod(out.shape)) * out.dtype.itemsize


@dataclasses.dataclass
class Cache:
  """This host's features of the first `stages` stages, for training and for evaluation."""
  stages: int
  train_index: np.ndarray  # view indices of this host's training examples, ascending
  train: np.ndarray  # their features, row i for train_index[i]
  eval: list  # evaluation batches with 'image' replaced by features
  seconds: float

  @property
  def nbytes(self) -> int:
    return self.train.nbytes + sum(b['image'].nbytes for b in self.eval)


def train_batches(cache: Cache | None, data_cfg, **kwargs) -> Iterator[dict]:
  """`input_pipeline.train_batches(data_cfg, **kwargs)`, with `cache`'s features for images."""
  if cache is None:
    return input_pipeline.train_batches(data_cfg, **kwargs)
  return _features(cache, input_pipeline.train_batches(data_cfg, images=False, **kwargs))


def _features(cache: Cache, batches) -> Iterator[dict]:
  for batch in batches:
    rows = np.searchsorted(cache.train_index, batch['index'])
    yield {'image': cache.train[rows], 'label': batch['label']}


def build(s, config: ConfigDict, state) -> Cache:
  """Runs the frozen prefix of `state`'s model once over this host's training and eval data."""
  t0 = time.perf_counter()
  extract = extractor(s.model, s.stage_names[s.cache_stages - 1], s.mesh, s.batch_sharding.spec)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  batch_size = config.train.eval_batch_size

  features = lambda batch: host_outputs(s, extract, variables, batch['image'])
  index, feats = [], []
  for batch in input_pipeline.eval_batches(config.data, global_batch_size=batch_size,
                                           split=config.data.train_split, train_view=True):
    real = batch['mask'] > 0
    index.append(batch['index'][real])
    feats.append(features(batch)[real])
  evaluation = [dict(batch, image=features(batch)) for batch in
                input_pipeline.eval_batches(config.data, global_batch_size=batch_size)]
  return Cache(stages=s.cache_stages, train_index=np.concatenate(index),
               train=np.concatenate(feats), eval=evaluation, seconds=time.perf_counter() - t0)


def host_outputs(s, extract, variables, images: np.ndarray) -> np.ndarray:
  """This host's rows of `extract(variables, images)`, `images` being this host's share of a
  global batch."""
  out = extract(variables, jax.make_array_from_process_local_data(s.batch_sharding, images))
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      out, s.mesh, s.batch_sharding.spec))


def extractor(model, stage: str, mesh, batch_spec):
  """jit(shard_map) of the inference forward pass returning `stage`'s output, batch-sharded."""
  def run(variables, images):
    return model.apply(variables, images, train=False, features=True)[1][stage]
  return jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), batch_spec), out_specs=batch_spec))
