"""Input pipeline: tfds datasets, the embedded `digits` and image folders, as numpy batches.

Augmentation follows the papers whose models we train: 32x32 data get a random crop from the image
zero-padded by 1/8 of its side and a horizontal flip (He et al., 2016, "Deep Residual Learning",
Sec. 4.2); ImageNet-sized data get the random-resized ("Inception") crop of Szegedy et al. (2015),
area 8-100%, aspect 3/4-4/3, and a flip; evaluation resizes (small data) or resizes the shorter side
to size/0.875 and takes the centre crop (large data). Transfer-learning views (a class subset as in
Yosinski et al., 2014, "How transferable are features in deep neural networks?"; N examples per
class; a fraction) are selected by example index, deterministically in `data.subset_seed`.

Order and resumption: each host reads the contiguous chunk of the (filtered) split that belongs to
it, caches it decoded, and every epoch shuffles it with a seed derived from (seed, epoch). Per-example
augmentation randomness is folded from (seed, epoch, example index) with stateless ops, so resuming
at `start_step` skips examples without augmenting them and reproduces the uninterrupted stream. Each
epoch yields `steps_per_epoch` full batches; the remainder is dropped (a different one each epoch).

Folder layout (tfds.folder_dataset.ImageFolder): `<folder>/<split>/<class>/<image>.{png,jpg,jpeg}`,
e.g. `my_data/train/cat/1.png`, `my_data/test/dog/7.jpg`; class ids follow the sorted class names.

Config keys read besides those the trainer documents: `subset_seed` (0), `manual_dir` (None: tfds'
`<data_dir>/downloads/manual`), `download` (True: try `download_and_prepare` when not prepared).
`cache` keeps the host's decoded images in memory: set it False for ImageNet-scale data.
"""

import dataclasses
import difflib
import functools
import math
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cnn_arch import digits  # Registers the `digits` builder with tfds.

try:  # The input pipeline must never take accelerator memory away from JAX.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices (then the caller hid them, or chose not to).
  pass

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per-dataset defaults. `crop`: pad-and-crop for small images; `inception`: random-resized crop.
# Datasets not listed get `crop` at their native size if their images are <= 64 pixels, else
# `inception` at 224, with ImageNet statistics (what pretrained networks expect).
DEFAULTS = {
    'digits': dict(image_size=32, mean=(0.3058,) * 3, std=(0.3761,) * 3, style='crop', flip=False),
    'mnist': dict(image_size=32, mean=(0.1307,) * 3, std=(0.3081,) * 3, style='crop', flip=False),
    'cifar10': dict(image_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    style='crop', flip=True),
    'cifar100': dict(image_size=32, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     style='crop', flip=True),
}
SMALL_IMAGE = 64
EVAL_CROP_FRACTION = 0.875  # 224 is the centre crop of the image resized to 256.
SPECIAL_NAMES = ('digits', 'folder')


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


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The hashable part of the `data` config that decides which examples are read and how."""
  name: str
  data_dir: str | None
  folder: str | None
  manual_dir: str | None
  download: bool
  classes: tuple[int, ...] | None
  per_class: int | None
  fraction: float | None
  subset_seed: int
  cache: bool


def _spec(cfg) -> _Spec:
  classes = cfg.get('classes')
  return _Spec(name=cfg.name, data_dir=cfg.get('data_dir'), folder=cfg.get('folder'),
               manual_dir=cfg.get('manual_dir'), download=cfg.get('download', True),
               classes=None if classes is None else tuple(int(c) for c in classes),
               per_class=cfg.get('per_class'), fraction=cfg.get('fraction'),
               subset_seed=cfg.get('subset_seed', 0), cache=cfg.get('cache', True))


########## Builders: find, prepare, and read the raw examples.


def _check_name(name: str) -> None:
  known = tfds.list_builders(with_community_datasets=False)
  if name in SPECIAL_NAMES or name.split(':')[0].split('/')[0] in known:
    return
  close = difflib.get_close_matches(name, list(SPECIAL_NAMES) + known, n=5)
  hint = f' Did you mean {", ".join(close)}?' if close else ''
  raise ValueError(f'Unknown dataset {name!r}.{hint} Use a tensorflow-datasets name '
                   f'(tfds.list_builders()), {SPECIAL_NAMES[0]!r} (embedded) or '
                   f"{SPECIAL_NAMES[1]!r} with data.folder.")


def _folder_builder(folder: str | None) -> tfds.core.DatasetBuilder:
  layout = 'expected <folder>/<split>/<class>/<image>.png|jpg|jpeg, e.g. <folder>/train/cat/1.png'
  if not folder:
    raise ValueError(f"data.name='folder' needs data.folder: {layout}.")
  try:
    entries = os.listdir(folder)
  except OSError as e:
    raise ValueError(f'Cannot read image folder {folder!r} ({e.strerror}); {layout}.') from e
  builder = tfds.folder_dataset.ImageFolder(folder)
  if not any(s.num_examples for s in builder.info.splits.values()):
    flat = [e for e in entries if os.path.isdir(os.path.join(folder, e)) and any(
        f.lower().endswith(('.png', '.jpg', '.jpeg')) for f in os.listdir(os.path.join(folder, e)))]
    hint = (f' Sub-folders {flat[:3]} hold images directly: move them under a split folder, '
            f'e.g. {os.path.join(folder, "train", flat[0])}.' if flat else '')
    raise ValueError(f'No images found in folder {folder!r}: {layout}.{hint}')
  return builder


def _download_help(builder, spec: _Spec, error: Exception) -> str:
  root = spec.data_dir or tfds.core.constants.DATA_DIR
  msg = (f'Dataset {spec.name!r} is not prepared under data_dir {root!r} and building it failed '
         f'({type(error).__name__}: {error}). Fix: on a machine with internet run '
         f'`tfds build {spec.name} --data_dir=DIR` and copy DIR/{builder.name} to {root!r}, or set '
         f'data.data_dir to a directory that already holds {builder.name}/.')
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual = spec.manual_dir or os.path.join(root, 'downloads', 'manual')
    msg += (f' This dataset needs a manual download into data.manual_dir ({manual!r}): '
            f'{" ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
  return msg


@functools.lru_cache(maxsize=None)
def _builder(spec: _Spec) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of `spec.name` (building `digits` offline on first use)."""
  _check_name(spec.name)
  if spec.name == 'folder':
    return _folder_builder(spec.folder)
  builder = tfds.builder(spec.name, data_dir=spec.data_dir)
  if builder.is_prepared():
    return builder
  if not spec.download and spec.name != 'digits':
    raise ValueError(_download_help(builder, spec, RuntimeError('data.download is False')))
  # `digits` never touches the network: no GCS lookup, nothing to download.
  config = tfds.download.DownloadConfig(manual_dir=spec.manual_dir,
                                        try_download_gcs=spec.name != 'digits')
  try:
    builder.download_and_prepare(download_config=config)
  except Exception as e:  # Network, missing manual files, ...: all need the same advice.
    raise RuntimeError(_download_help(builder, spec, e)) from e
  return builder


def _read(builder, name: str, start: int, stop: int, total: int) -> tf.data.Dataset:
  """Examples [start, stop) of split `name` in canonical order, images still encoded."""
  # One file at a time keeps the order of a slice identical to that of the whole split, so an
  # example's index is the same whichever host or view reads it.
  read_config = tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1)
  if stop <= start:  # A host with no share (fewer examples than hosts) still needs a dataset.
    return builder.as_dataset(split=name, decoders={'image': tfds.decode.SkipDecoding()}).take(0)
  whole = isinstance(builder, tfds.folder_dataset.ImageFolder) or (start, stop) == (0, total)
  split = name if whole else tfds.core.ReadInstruction(name, from_=start, to=stop, unit='abs')
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                          decoders={'image': tfds.decode.SkipDecoding()})
  if whole and (start, stop) != (0, total):  # ImageFolder has no sub-split API.
    ds = ds.skip(start).take(stop - start)
  return ds


@functools.lru_cache(maxsize=None)
def _split_range(spec: _Spec, split: str) -> tuple[str, int, int]:
  """Resolves e.g. 'train[:90%]' to ('train', 0, 45000)."""
  builder = _builder(spec)
  name = split.split('[')[0]
  known = list(builder.info.splits.keys())
  if known and name not in known:
    raise ValueError(f'Dataset {spec.name!r} has no split {name!r}; it has {", ".join(known)}.')
  total = int(builder.as_dataset(split=name).cardinality())
  info = {name: tfds.core.SplitInfo(name=name, shard_lengths=[total], num_bytes=0)}
  (ins,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(info)
  return name, ins.from_ or 0, total if ins.to is None else ins.to


@functools.lru_cache(maxsize=None)
def _labels(spec: _Spec, split: str) -> np.ndarray:
  """Labels of every example of `split`, in canonical order (one pass, images not decoded)."""
  name, start, stop = _split_range(spec, split)
  ds = _read(_builder(spec), name, start, stop, _split_range(spec, name)[2])
  batches = ds.map(lambda e: e['label']).batch(8192).as_numpy_iterator()
  return np.concatenate(list(batches) or [np.zeros([0], np.int64)])


########## Views: which examples of a split belong to the configured view, and their new labels.


def _check_view(spec: _Spec, num_classes: int) -> None:
  if spec.classes is not None:
    bad = [c for c in spec.classes if not 0 <= c < num_classes]
    if not spec.classes or bad or len(set(spec.classes)) != len(spec.classes):
      raise ValueError(f'data.classes={list(spec.classes)} must be distinct label ids in '
                       f'[0, {num_classes}) of {spec.name!r}' + (f'; {bad} are not.' if bad else '.'))
  if spec.per_class is not None and spec.fraction is not None:
    raise ValueError('Set at most one of data.per_class and data.fraction.')
  if spec.per_class is not None and (int(spec.per_class) != spec.per_class or spec.per_class < 1):
    raise ValueError(f'data.per_class={spec.per_class} must be a positive integer.')
  if spec.fraction is not None and not 0 < spec.fraction <= 1:
    raise ValueError(f'data.fraction={spec.fraction} must be in (0, 1].')


@functools.lru_cache(maxsize=None)
def _selection(spec: _Spec, split: str, train: bool) -> np.ndarray | None:
  """Sorted indices (within `split`) of the view's examples; None when the view is the whole split.

  `per_class` and `fraction` apply to the training split only (evaluation keeps every example of
  the chosen classes). Each class is permuted with a seed from (subset_seed, class), so for a given
  seed the 5-shot subset is contained in the 10-shot one; `fraction` keeps round(fraction * n_c),
  at least one, of each class.
  """
  few_shot = train and (spec.per_class is not None or spec.fraction is not None)
  if spec.classes is None and not few_shot:
    return None
  labels = _labels(spec, split)
  classes = spec.classes if spec.classes is not None else range(_num_classes(spec))
  chosen = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    if few_shot:
      members = np.random.default_rng([spec.subset_seed, c]).permutation(members)
      want = spec.per_class or max(1, round(spec.fraction * len(members)))
      if len(members) < want:
        raise ValueError(f'data.per_class={spec.per_class} but class {c} has only {len(members)} '
                         f'examples in split {split!r} of {spec.name!r}; lower per_class or drop '
                         f'class {c} from data.classes.')
      members = members[:want]
    if not len(members):
      raise ValueError(f'Class {c} has 0 examples in split {split!r} of {spec.name!r} '
                       f'(split size {len(labels)}); remove it from data.classes.')
    chosen.append(members)
  return np.sort(np.concatenate(chosen))


def _num_classes(spec: _Spec) -> int:
  return _builder(spec).info.features['label'].num_classes


def _count(spec: _Spec, split: str, train: bool) -> int:
  keep = _selection(spec, split, train)
  _, start, stop = _split_range(spec, split)
  return stop - start if keep is None else len(keep)


@functools.lru_cache(maxsize=None)
def _host_examples(spec: _Spec, split: str, train: bool, host: int, hosts: int) -> tf.data.Dataset:
  """This host's contiguous chunk of the view: {'index', 'image' (uint8, decoded), 'label'}."""
  builder = _builder(spec)
  name, start, stop = _split_range(spec, split)
  keep = _selection(spec, split, train)
  count = _count(spec, split, train)
  lo, hi = host * count // hosts, (host + 1) * count // hosts
  mine = np.arange(lo, hi) if keep is None else keep[lo:hi]
  first, last = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
  ds = _read(builder, name, start + first, start + last, _split_range(spec, name)[2])
  ds = ds.enumerate(first).map(lambda i, e: dict(e, index=i))
  if keep is not None:
    member = np.zeros(last - first, bool)
    member[mine - first] = True
    ds = ds.filter(lambda e: tf.gather(member, e['index'] - first))
  remap = np.arange(_num_classes(spec))
  if spec.classes is not None:
    remap = np.full_like(remap, -1)
    remap[list(spec.classes)] = np.arange(len(spec.classes))
  decode = builder.info.features['image'].decode_example
  ds = ds.map(lambda e: {'index': e['index'], 'image': decode(e['image']),
                         'label': tf.gather(tf.constant(remap, tf.int32), e['label'])},
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.cache() if spec.cache else ds


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
  spec = _spec(data_cfg)
  builder = _builder(spec)
  missing = {'image', 'label'} - set(builder.info.features.keys())
  if missing:
    raise ValueError(f'Dataset {spec.name!r} has no {sorted(missing)} feature; only image '
                     f'classification datasets with "image" and "label" are supported.')
  names = builder.info.features['label'].names
  _check_view(spec, len(names))
  classes = spec.classes if spec.classes is not None else range(len(names))
  prep = _prep(data_cfg, builder)
  return DatasetInfo(name=spec.name, num_classes=len(classes),
                     class_names=tuple(names[c] for c in classes), image_size=prep.size,
                     num_train=_count(spec, data_cfg.train_split, True),
                     num_eval=_count(spec, data_cfg.eval_split, False), mean=prep.mean,
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


def _numpy(ds: tf.data.Dataset, spec: _Spec) -> Iterator[dict[str, np.ndarray]]:
  try:
    yield from ds.as_numpy_iterator()
  except Exception as e:  # Not `except tf.errors...`: `tf` may be gone when Python exits.
    if not isinstance(e, tf.errors.InvalidArgumentError):  # Typically a file that is no image.
      raise
    where = f'folder {spec.folder!r}' if spec.name == 'folder' else f'dataset {spec.name!r}'
    raise ValueError(f'Could not decode an image of {where}: {e.message.splitlines()[0]}. Remove '
                     f'or convert files that are not PNG/JPEG images.') from e


def train_batches(data_cfg, *, global_batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Infinite stream of this host's {'image': f32 [B, H, W, 3], 'label': i32 [B]} training batches.

  B = global_batch_size // process_count. Batch `start_step` is the batch an uninterrupted stream
  yields at that step; skipped examples are not augmented (and, cached, not decoded again).
  """
  spec, info = _spec(data_cfg), get_info(data_cfg)
  local = _local_batch(global_batch_size)
  per_epoch = steps_per_epoch(info, global_batch_size)
  if per_epoch == 0:
    raise ValueError(f'Global batch size {global_batch_size} exceeds the {info.num_train} training '
                     f'examples of {spec.name!r} (per host: {info.num_train // jax.process_count()})'
                     '; lower the batch size.')
  prep = _prep(data_cfg, _builder(spec))
  base = _host_examples(spec, data_cfg.train_split, True, jax.process_index(), jax.process_count())
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
  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  return _numpy(ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE), spec)


def eval_batches(data_cfg, *, global_batch_size: int,
                 split: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """This host's examples of `split` (default data.eval_split) once each, in padded batches.

  Yields {'image', 'label', 'mask'}; `mask` is float32, 0 for padding. Every host yields the same
  number of batches (the largest host share, rounded up), as the trainer's collectives need.
  """
  spec, split = _spec(data_cfg), split or data_cfg.eval_split
  local = _local_batch(global_batch_size)
  prep = _prep(data_cfg, _builder(spec))
  hosts = jax.process_count()
  largest_share = -(-_count(spec, split, False) // hosts)
  num_batches = -(-largest_share // local)
  base = _host_examples(spec, split, False, jax.process_index(), hosts)
  ds = base.map(lambda ex: {'image': _eval_image(ex['image'], prep), 'label': ex['label']},
                num_parallel_calls=tf.data.AUTOTUNE)
  batches = _numpy(ds.batch(local).prefetch(tf.data.AUTOTUNE), spec)
  for _ in range(num_batches):
    batch = next(batches, None) or {'image': np.zeros([0, prep.size, prep.size, 3], np.float32),
                                    'label': np.zeros([0], np.int32)}
    n = len(batch['label'])
    yield {'image': _pad(batch['image'], local), 'label': _pad(batch['label'], local),
           'mask': (np.arange(local) < n).astype(np.float32)}


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])
