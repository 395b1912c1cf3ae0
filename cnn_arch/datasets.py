"""Which examples a run reads: tfds builders (the embedded `digits`, image folders, any tfds
name), splits, transfer-learning views and each host's shard.

Views (a class subset as in Yosinski et al., 2014, "How transferable are features in deep neural
networks?"; N examples per class; a fraction) are selected by example index, deterministically in
`data.subset_seed`. Each host reads the contiguous chunk of the (filtered) split that belongs to
it, in canonical order, so an example's index is the same whichever host or view reads it.
`cnn_arch.input_pipeline` turns these examples into batches.
"""

import dataclasses
import difflib
import fcntl
import functools
import os
import socket

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Importing them registers the embedded builders with tfds.
from cnn_arch import digits, fractaldb, mnist  # pylint: disable=unused-import

SPECIAL_NAMES = ('digits', 'folder')
# Built on this machine from installed packages, never downloaded (see each module).
EMBEDDED = ('digits', 'mnist_offline', 'optdigits', 'fractaldb')


@dataclasses.dataclass(frozen=True)
class Spec:
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


def spec_of(cfg) -> Spec:
  classes = cfg.get('classes')
  return Spec(name=cfg.name, data_dir=cfg.get('data_dir'), folder=cfg.get('folder'),
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
                   f'(tfds.list_builders()), an embedded one ({", ".join(EMBEDDED)}) or '
                   f"{SPECIAL_NAMES[1]!r} with data.folder.")


def _embedded(name: str) -> bool:
  return name.split(':')[0].split('/')[0] in EMBEDDED


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
  _check_folder(folder)
  return builder


IMAGE_MAGIC = {'.png': b'\x89PNG', '.jpg': b'\xff\xd8', '.jpeg': b'\xff\xd8'}


def _check_folder(folder: str) -> None:
  """Refuses, naming the path, what would fail later or train on nonsense: a class folder with
  no images, a class that a split has and 'train' lacks, a file that is no PNG/JPEG image."""
  classes = {}
  for split in sorted(os.listdir(folder)):
    split_dir = os.path.join(folder, split)
    if not os.path.isdir(split_dir):
      continue
    classes[split] = set()
    for name in sorted(os.listdir(split_dir)):
      class_dir = os.path.join(split_dir, name)
      if not os.path.isdir(class_dir):
        continue
      images = {f: os.path.splitext(f)[1].lower() for f in sorted(os.listdir(class_dir))}
      images = {f: ext for f, ext in images.items() if ext in IMAGE_MAGIC}
      if not images:
        raise ValueError(f'Class folder {class_dir} holds no .png/.jpg/.jpeg image; add images '
                         'or remove the folder.')
      for f, ext in images.items():
        with open(os.path.join(class_dir, f), 'rb') as image:
          if not image.read(4).startswith(IMAGE_MAGIC[ext]):
            raise ValueError(f'{os.path.join(class_dir, f)} is not a {ext} image; convert it or '
                             'remove it.')
      classes[split].add(name)
  for split, names in classes.items():
    missing = sorted(names - classes.get('train', names))
    if missing:
      raise ValueError(f'Split {split!r} of folder {folder!r} has class(es) {missing} that '
                       f"'train' lacks (e.g. {os.path.join(folder, split, missing[0])}); a model "
                       "trained on 'train' cannot predict them: add training images or remove "
                       'the folder.')


DOWNLOAD_HOST = ('storage.googleapis.com', 443)  # where tfds looks for prepared datasets first
ONLINE_TIMEOUT_S = 3


def _downloads(builder) -> bool:
  """False under `tfds.testing.mock_data`, which replaces the download with a no-op."""
  return type(builder).download_and_prepare.__name__ != 'mock_download_and_prepare'


def _online() -> bool:
  try:
    socket.create_connection(DOWNLOAD_HOST, timeout=ONLINE_TIMEOUT_S).close()
    return True
  except OSError:
    return False


def _download_help(builder, spec: Spec, error: Exception) -> str:
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
def prepared_builder(spec: Spec) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder of `spec.name` (building an embedded one offline on first use)."""
  _check_name(spec.name)
  if spec.name == 'folder':
    return _folder_builder(spec.folder)
  builder = tfds.builder(spec.name, data_dir=spec.data_dir)
  if builder.is_prepared():
    return builder
  if _embedded(spec.name):  # No GCS lookup, nothing to download; the builder's errors say the fix.
    # One process prepares, the others (pytest workers, hosts on a shared disk) wait for it:
    # tfds's final rename fails in every process but the first.
    os.makedirs(os.path.dirname(builder.data_dir), exist_ok=True)
    with open(builder.data_dir + '.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = tfds.builder(spec.name, data_dir=spec.data_dir)
      if not builder.is_prepared():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=spec.manual_dir, try_download_gcs=False))
    return builder
  if not spec.download:
    raise ValueError(_download_help(builder, spec, RuntimeError('data.download is False')))
  if _downloads(builder) and not _online():  # tfds would retry
    raise RuntimeError(_download_help(builder, spec, ConnectionError(
        f'no network: {DOWNLOAD_HOST[0]} could not be reached within {ONLINE_TIMEOUT_S} s')))
  config = tfds.download.DownloadConfig(manual_dir=spec.manual_dir)
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


def split_names(spec: Spec) -> tuple[str, ...]:
  return tuple(prepared_builder(spec).info.splits.keys())


def eval_split(cfg) -> str:
  """data.eval_split, or by default (None) `validation` where the dataset has one, else `test`:
  what a run evaluates during training and selects its best checkpoint on."""
  if cfg.get('eval_split'):
    return cfg.eval_split
  return 'validation' if 'validation' in split_names(spec_of(cfg)) else 'test'


def test_split(cfg) -> str | None:
  """data.test_split, or by default `test` unless it is the evaluation split or missing: the
  split a run evaluates once, at the end, for its final number."""
  split = cfg.get('test_split') or 'test'
  if split == eval_split(cfg) or (not cfg.get('test_split') and
                                  'test' not in split_names(spec_of(cfg))):
    return None
  return split


@functools.lru_cache(maxsize=None)
def _split_range(spec: Spec, split: str) -> tuple[str, int, int]:
  """Resolves e.g. 'train[:90%]' to ('train', 0, 45000)."""
  builder = prepared_builder(spec)
  name = split.split('[')[0]
  known = list(builder.info.splits.keys())
  if known and name not in known:
    raise ValueError(f'Dataset {spec.name!r} has no split {name!r}; it has {", ".join(known)}.')
  total = int(builder.as_dataset(split=name).cardinality())
  info = {name: tfds.core.SplitInfo(name=name, shard_lengths=[total], num_bytes=0)}
  (ins,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(info)
  return name, ins.from_ or 0, total if ins.to is None else ins.to


def _whole(spec: Spec) -> Spec:
  """The spec of the whole dataset: what a view's selection is computed from."""
  return dataclasses.replace(spec, classes=None, per_class=None, fraction=None, subset_seed=0)


def _labels(spec: Spec, split: str) -> np.ndarray:
  """Labels of every example of `split`, in canonical order (one pass, images not decoded)."""
  return _whole_labels(_whole(spec), split)


@functools.lru_cache(maxsize=None)
def _whole_labels(spec: Spec, split: str) -> np.ndarray:
  name, start, stop = _split_range(spec, split)
  ds = _read(prepared_builder(spec), name, start, stop, _split_range(spec, name)[2])
  batches = ds.map(lambda e: e['label']).batch(8192).as_numpy_iterator()
  return np.concatenate(list(batches) or [np.zeros([0], np.int64)])


@functools.lru_cache(maxsize=None)
def _decoded(spec: Spec, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, C], labels) of a whole split of an embedded dataset, decoded once.

  Embedded datasets are small (MNIST's 70,000 images are 55 MB decoded), and a sweep draws many
  views of them: reading their records again for every view would cost more than training.
  """
  builder = prepared_builder(spec)
  total = _split_range(spec, name)[2]
  decode = builder.info.features['image'].decode_example
  ds = _read(builder, name, 0, total, total).map(
      lambda e: (decode(e['image']), e['label']), num_parallel_calls=tf.data.AUTOTUNE)
  parts = list(ds.batch(8192).as_numpy_iterator())
  return tuple(np.concatenate([p[i] for p in parts]) for i in (0, 1))


########## Views: which examples of a split belong to the configured view, and their new labels.


def check_view(spec: Spec, num_classes: int) -> None:
  if spec.classes is not None:
    bad = [c for c in spec.classes if not 0 <= c < num_classes]
    if not spec.classes or bad or len(set(spec.classes)) != len(spec.classes):
      raise ValueError(f'data.classes={list(spec.classes)} must be distinct label ids in '
                       f'[0, {num_classes}) of {spec.name!r}' + (f'; {bad} are not.' if bad else '.'))


@functools.lru_cache(maxsize=None)
def _selection(spec: Spec, split: str, train: bool) -> np.ndarray | None:
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
  classes = spec.classes if spec.classes is not None else range(num_classes(spec))
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


def num_classes(spec: Spec) -> int:
  return prepared_builder(spec).info.features['label'].num_classes


def count(spec: Spec, split: str, train: bool) -> int:
  keep = _selection(spec, split, train)
  _, start, stop = _split_range(spec, split)
  return stop - start if keep is None else len(keep)


@functools.lru_cache(maxsize=None)
def host_examples(spec: Spec, split: str, train: bool, host: int, hosts: int) -> tf.data.Dataset:
  """This host's contiguous chunk of the view: {'index', 'image' (uint8, decoded), 'label'}."""
  builder = prepared_builder(spec)
  name, start, stop = _split_range(spec, split)
  keep = _selection(spec, split, train)
  total = count(spec, split, train)
  lo, hi = host * total // hosts, (host + 1) * total // hosts
  mine = np.arange(lo, hi) if keep is None else keep[lo:hi]
  remap = np.arange(num_classes(spec))
  if spec.classes is not None:
    remap = np.full_like(remap, -1)
    remap[list(spec.classes)] = np.arange(len(spec.classes))
  if _embedded(spec.name):
    images, labels = _decoded(_whole(spec), name)
    return tf.data.Dataset.from_tensor_slices({
        'index': mine.astype(np.int64), 'image': images[start + mine],
        'label': remap[labels[start + mine]].astype(np.int32)})
  first, last = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
  ds = _read(builder, name, start + first, start + last, _split_range(spec, name)[2])
  ds = ds.enumerate(first).map(lambda i, e: dict(e, index=i))
  if keep is not None:
    member = np.zeros(last - first, bool)
    member[mine - first] = True
    ds = ds.filter(lambda e: tf.gather(member, e['index'] - first))
  decode = builder.info.features['image'].decode_example
  ds = ds.map(lambda e: {'index': e['index'], 'image': decode(e['image']),
                         'label': tf.gather(tf.constant(remap, tf.int32), e['label'])},
              num_parallel_calls=tf.data.AUTOTUNE)
  return ds.cache() if spec.cache else ds
