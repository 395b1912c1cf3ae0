"""Input pipeline: the examples `cnn_arch.datasets` selects, as augmented numpy batches.

Augmentation follows the papers whose models we train: 32x32 data get a random crop from the image
zero-padded by 1/8 of its side and a horizontal flip (He et al., 2016, "Deep Residual Learning",
Sec. 4.2); ImageNet-sized data get the random-resized ("Inception") crop of Szegedy et al. (2015),
area 8-100%, aspect 3/4-4/3, and a flip; evaluation resizes (small data) or resizes the shorter side
to size/0.875 and takes the centre crop (large data).

Order and resumption: each host caches its shard decoded, and every epoch shuffles it with a seed
derived from (seed, epoch). Per-example augmentation randomness is folded from (seed, epoch,
example index) with stateless ops, so resuming at `start_step` skips examples without augmenting
them and reproduces the uninterrupted stream. Each epoch yields `steps_per_epoch` full batches; the
remainder is dropped (a different one each epoch). Evaluation pads the last batch and masks it.

Folder layout (tfds.folder_dataset.ImageFolder): `<folder>/<split>/<class>/<image>.{png,jpg,jpeg}`,
e.g. `my_data/train/cat/1.png`, `my_data/test/dog/7.jpg`; class ids follow the sorted class names.
`data.cache` keeps the host's decoded images in memory: set it False for ImageNet-scale data.
"""

import dataclasses
import math
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from cnn_arch import datasets
from cnn_arch.models.common import IMAGENET_MEAN, IMAGENET_STD

try:  # The input pipeline must never take accelerator memory away from JAX.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices (then the caller hid them, or chose not to).
  pass

# Per-dataset defaults. `crop`: pad-and-crop for small images; `inception`: random-resized crop.
# Datasets not listed get `crop` at their native size if their images are <= 64 pixels, else
# `inception` at 224, with ImageNet statistics (what pretrained networks expect).
DEFAULTS = {
    'digits': dict(image_size=32, mean=(0.3058,) * 3, std=(0.3761,) * 3, style='crop', flip=False),
    'mnist': dict(image_size=32, mean=(0.1307,) * 3, std=(0.3081,) * 3, style='crop', flip=False),
    'mnist_offline': dict(image_size=32, mean=(0.1307,) * 3, std=(0.3081,) * 3, style='crop',
                          flip=False),
    'optdigits': dict(image_size=32, mean=(0.3078,) * 3, std=(0.3771,) * 3, style='crop',
                      flip=False),
    'fractaldb': dict(image_size=32, mean=(0.1978,) * 3, std=(0.3129,) * 3, style='crop',
                      flip=True),
    'cifar10': dict(image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    style='crop', flip=True),
    'cifar100': dict(image_size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     style='crop', flip=True),
}
SMALL_IMAGE = 64
EVAL_CROP_FRACTION = 0.875  # 224 is the centre crop of the image resized to 256.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about the configured view of a dataset."""
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_size: int
  num_train: int
  num_eval: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


########## Preprocessing: augmentation for training, resize/centre crop for evaluation.


@dataclasses.dataclass(frozen=True)
class _Prep:
  size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  style: str  # 'crop' (pad and crop) or 'inception' (random-resized crop).
  flip: bool
  augment: bool


def _prep(cfg, builder) -> _Prep:
  defaults = DEFAULTS.get(cfg.name.split(':')[0].split('/')[0])
  if defaults is None:
    shape = builder.info.features['image'].shape
    small = shape[0] is not None and max(shape[:2]) <= SMALL_IMAGE
    defaults = dict(image_size=shape[0] if small else 224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                    style='crop' if small else 'inception', flip=True)
  mean, std = cfg.get('mean'), cfg.get('std')
  return _Prep(size=int(cfg.get('image_size') or defaults['image_size']),
               mean=_per_channel(defaults['mean'] if mean is None else mean),
               std=_per_channel(defaults['std'] if std is None else std),
               style=defaults['style'], flip=defaults['flip'], augment=cfg.get('augment', True))


def _per_channel(values) -> tuple[float, float, float]:
  values = tuple(float(v) for v in values)
  return values * 3 if len(values) == 1 else values


def _float_rgb(image: tf.Tensor) -> tf.Tensor:
  image = tf.cast(image, tf.float32)
  return tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  if tuple(image.shape[:2]) == (size, size):
    return image
  return tf.image.resize(image, [size, size], antialias=True)


def _normalise(image: tf.Tensor, prep: _Prep) -> tf.Tensor:
  return (image - 255.0 * np.array(prep.mean, np.float32)) / (255.0 * np.array(prep.std, np.float32))


def _eval_image(image: tf.Tensor, prep: _Prep) -> tf.Tensor:
  image = _float_rgb(image)
  if prep.style == 'inception':  # Shorter side to size / 0.875, then the centre square.
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = prep.size / EVAL_CROP_FRACTION / tf.reduce_min(hw)
    new = tf.cast(tf.round(hw * scale), tf.int32)
    image = tf.image.resize(image, new, antialias=True)
    top, left = (new[0] - prep.size) // 2, (new[1] - prep.size) // 2
    image = image[top:top + prep.size, left:left + prep.size]
  return _normalise(_resize(image, prep.size), prep)


def _train_image(image: tf.Tensor, seed: tf.Tensor, prep: _Prep) -> tf.Tensor:
  """Augments one image with randomness drawn only from `seed` (shape [2])."""
  if not prep.augment:
    return _eval_image(image, prep)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if prep.style == 'crop':
    image = _resize(_float_rgb(image), prep.size)
    pad = prep.size // 8  # 4 pixels at 32x32, as in He et al. (2016).
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [prep.size, prep.size, 3], seed=crop_seed)
  else:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.image.resize(_float_rgb(tf.slice(image, begin, size)), [prep.size] * 2,
                            antialias=True)
  if prep.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return _normalise(image, prep)


########## The API the trainer calls.


def get_info(data_cfg) -> DatasetInfo:
  """Validates the `data` config and describes its view (counts the view's examples if filtered)."""
  spec = datasets.spec_of(data_cfg)
  builder = datasets.prepared_builder(spec)
  missing = {'image', 'label'} - set(builder.info.features.keys())
  if missing:
    raise ValueError(f'Dataset {spec.name!r} has no {sorted(missing)} feature; only image '
                     f'classification datasets with "image" and "label" are supported.')
  names = builder.info.features['label'].names
  datasets.check_view(spec, len(names))
  classes = spec.classes if spec.classes is not None else range(len(names))
  prep = _prep(data_cfg, builder)
  return DatasetInfo(name=spec.name, num_classes=len(classes),
                     class_names=tuple(names[c] for c in classes), image_size=prep.size,
                     num_train=datasets.count(spec, data_cfg.train_split, True),
                     num_eval=datasets.count(spec, datasets.eval_split(data_cfg), False), mean=prep.mean,
                     std=prep.std)


def steps_per_epoch(info: DatasetInfo, global_batch_size: int) -> int:
  """Full global batches per epoch; every host counts the same (its share rounded down)."""
  return (info.num_train // jax.process_count()) // _local_batch(global_batch_size)


def _local_batch(global_batch_size: int) -> int:
  hosts, devices = jax.process_count(), jax.device_count()
  unit = math.lcm(hosts, devices)
  if global_batch_size < unit or global_batch_size % unit:
    below, above = max(unit, global_batch_size // unit * unit), -(-global_batch_size // unit) * unit
    raise ValueError(f'Global batch size {global_batch_size} does not divide over {hosts} host(s) '
                     f'and {devices} device(s): use a multiple of {unit}, e.g. {below} or {above}.')
  return global_batch_size // hosts


def _numpy(ds: tf.data.Dataset, spec: datasets.Spec) -> Iterator[dict[str, np.ndarray]]:
  try:
    yield from ds.as_numpy_iterator()
  except Exception as e:  # Not `except tf.errors...`: `tf` may be gone when Python exits.
    if not isinstance(e, tf.errors.InvalidArgumentError):  # Typically a file that is no image.
      raise
    where = f'folder {spec.folder!r}' if spec.name == 'folder' else f'dataset {spec.name!r}'
    raise ValueError(f'Could not decode an image of {where}: {e.message.splitlines()[0]}. Remove '
                     f'or convert files that are not PNG/JPEG images.') from e


def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                  images: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Infinite stream of this host's {'image': f32 [B, H, W, 3], 'label': i32 [B]} training batches.

  B = global_batch_size // process_count. Batch `start_step` is the batch an uninterrupted stream
  yields at that step; skipped examples are not augmented (and, cached, not decoded again).
  `images=False` yields {'index', 'label'} instead: the same examples, by their view index, for
  a trainer that looks their features up (`cnn_arch.feature_cache`).
  """
  spec, info = datasets.spec_of(data_cfg), get_info(data_cfg)
  local = _local_batch(global_batch_size)
  per_epoch = steps_per_epoch(info, global_batch_size)
  if per_epoch == 0:
    raise ValueError(f'Global batch size {global_batch_size} exceeds the {info.num_train} training '
                     f'examples of {spec.name!r} (per host: {info.num_train // jax.process_count()})'
                     '; lower the batch size.')
  prep = _prep(data_cfg, datasets.prepared_builder(spec))
  base = datasets.host_examples(spec, data_cfg.train_split, True, jax.process_index(), jax.process_count())
  buffer = max(1, min(data_cfg.get('shuffle_buffer', 10_000), info.num_train))
  seed = tf.constant(seed, tf.int64)

  def epoch(e):
    ds = base.shuffle(buffer, seed=seed * 1_000_003 + e, reshuffle_each_iteration=False)
    return ds.take(per_epoch * local).map(lambda ex: dict(ex, epoch=e))

  @tf.autograph.experimental.do_not_convert  # plain TF ops; autograph only warns on closures
  def augment(ex):
    key = tf.random.experimental.stateless_fold_in(tf.stack([seed, ex['epoch']]), ex['index'])
    return {'image': _train_image(ex['image'], key, prep), 'label': ex['label']}

  first_epoch, step_in_epoch = divmod(start_step, per_epoch)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch).skip(step_in_epoch * local)
  if images:
    ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = ds.map(lambda ex: {'index': ex['index'], 'label': ex['label']})
  return _numpy(ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE), spec)


def eval_batches(data_cfg, *, global_batch_size: int, split: str | None = None,
                 train_view: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """This host's examples of `split` (default: `datasets.eval_split`) once each, in padded batches.

  Yields {'image', 'label', 'mask'}; `mask` is float32, 0 for padding. Every host yields the same
  number of batches (the largest host share, rounded up), as the trainer's collectives need.
  `train_view=True` reads the training view of `split` (data.per_class/fraction applied), still
  without augmentation, and adds each example's view 'index' (as `train_batches` yields it).
  """
  spec, split = datasets.spec_of(data_cfg), split or datasets.eval_split(data_cfg)
  local = _local_batch(global_batch_size)
  prep = _prep(data_cfg, datasets.prepared_builder(spec))
  hosts = jax.process_count()
  largest_share = -(-datasets.count(spec, split, train_view) // hosts)
  num_batches = -(-largest_share // local)
  base = datasets.host_examples(spec, split, train_view, jax.process_index(), hosts)
  keys = ('image', 'label', 'index') if train_view else ('image', 'label')
  ds = base.map(lambda ex: {k: _eval_image(ex[k], prep) if k == 'image' else ex[k] for k in keys},
                num_parallel_calls=tf.data.AUTOTUNE)
  batches = _numpy(ds.batch(local).prefetch(tf.data.AUTOTUNE), spec)
  empty = {'image': np.zeros([0, prep.size, prep.size, 3], np.float32),
           'label': np.zeros([0], np.int32), 'index': np.zeros([0], np.int64)}
  for _ in range(num_batches):
    batch = next(batches, None) or {k: empty[k] for k in keys}
    n = len(batch['label'])
    yield {**{k: _pad(batch[k], local) for k in keys},
           'mask': (np.arange(local) < n).astype(np.float32)}


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])
