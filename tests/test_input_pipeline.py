"""Tests for cnn_arch.input_pipeline and the embedded `digits` builder (offline, < 60 s)."""

import collections
import socket

import jax
import ml_collections
import numpy as np
import pytest
from sklearn.datasets import load_digits
import tensorflow as tf
import tensorflow_datasets as tfds

from cnn_arch import datasets, digits
from cnn_arch import input_pipeline as ip

# The split table documented in cnn_arch/digits.py.
SPLIT_COUNTS = {
    'train': [124, 128, 124, 128, 127, 128, 127, 125, 122, 126],
    'validation': [18, 18, 18, 18, 18, 18, 18, 18, 17, 18],
    'test': [36, 36, 35, 37, 36, 36, 36, 36, 35, 36],
}


def _no_network(*args, **kwargs):
  raise AssertionError(f'Network access attempted: {args}')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A fresh data_dir holding `digits`, built with every socket connection refused."""
  path = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'create_connection', _no_network)
    ip.get_info(_cfg(path))
  return path


@pytest.fixture(scope='module')
def sklearn_digits():
  data = load_digits()
  return digits.to_uint8(data.images), data.target


def _cfg(data_dir, **overrides):
  cfg = dict(name='digits', data_dir=data_dir, folder=None, train_split='train',
             eval_split='test', image_size=None, mean=None, std=None, augment=True, classes=None,
             per_class=None, fraction=None, shuffle_buffer=10_000, cache=True)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _unnormalise(images, info):
  """Back to uint8 pixels (first channel), for exact comparison with stored images."""
  pixels = images[..., 0] * info.std[0] * 255 + info.mean[0] * 255
  return np.round(pixels).astype(np.uint8)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _simulate_hosts(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


########## The embedded builder.


def test_digits_splits_are_stratified_disjoint_and_complete(data_dir, sklearn_digits):
  builder = tfds.builder('digits', data_dir=data_dir)
  images, labels = sklearn_digits
  seen = []
  for split, counts in SPLIT_COUNTS.items():
    examples = list(builder.as_dataset(split=split).as_numpy_iterator())
    ids = np.array([e['id'] for e in examples])
    assert np.bincount([e['label'] for e in examples]).tolist() == counts
    np.testing.assert_array_equal(np.stack([e['image'] for e in examples]), images[ids])
    np.testing.assert_array_equal([e['label'] for e in examples], labels[ids])
    seen.extend(ids)
  assert sorted(seen) == list(range(1797))


def test_digits_pixels_are_rescaled_to_uint8():
  np.testing.assert_array_equal(digits.to_uint8(np.array([[0.0, 8.0, 16.0]]))[..., 0],
                                [[0, 128, 255]])


########## Batches: shapes, dtypes, values.


def test_info_defaults(data_dir):
  info = ip.get_info(_cfg(data_dir, eval_split='validation'))
  assert (info.num_classes, info.image_size, info.num_train, info.num_eval) == (10, 32, 1259, 179)
  assert info.class_names == tuple('0123456789')


def test_train_batch_shapes_dtypes_and_values(data_dir):
  cfg = _cfg(data_dir)
  info = ip.get_info(cfg)
  batch = next(ip.train_batches(cfg, global_batch_size=64, seed=0))
  assert batch['image'].shape == (64, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  assert set(batch['label']) <= set(range(10))
  low, high = (0 - info.mean[0]) / info.std[0], (1 - info.mean[0]) / info.std[0]
  # Padding and background are black; bilinear upsampling stays inside the pixel range.
  assert batch['image'].min() == pytest.approx(low, abs=1e-5)
  assert batch['image'].max() <= high + 1e-5
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])  # Grey as RGB.


def test_eval_at_native_size_reproduces_sklearn_pixels(data_dir, sklearn_digits):
  cfg = _cfg(data_dir, image_size=8)
  info = ip.get_info(cfg)
  batches = list(ip.eval_batches(cfg, global_batch_size=64))
  images = np.concatenate([b['image'] for b in batches])[:info.num_eval]
  ref = {im.tobytes(): y for im, y in zip(*sklearn_digits)}
  pixels = _unnormalise(images, info)
  assert all(p.tobytes() in ref for p in pixels)
  normalised = (sklearn_digits[0][..., 0] / 255 - info.mean[0]) / info.std[0]
  assert abs(normalised.mean()) < 0.02 and abs(normalised.std() - 1) < 0.02


########## Transfer-learning views.


def test_class_subset_remaps_labels_and_keeps_only_those_digits(data_dir, sklearn_digits):
  cfg = _cfg(data_dir, image_size=8, augment=False, classes=[5, 6, 7, 8, 9])
  info = ip.get_info(cfg)
  assert info.num_classes == 5 and info.class_names == ('5', '6', '7', '8', '9')
  assert info.num_train == sum(SPLIT_COUNTS['train'][5:])
  ref = collections.defaultdict(set)
  for im, y in zip(*sklearn_digits):
    ref[im[..., 0].tobytes()].add(int(y))
  batches = list(ip.eval_batches(cfg, global_batch_size=32))
  labels = np.concatenate([b['label'] for b in batches])[:info.num_eval]
  pixels = _unnormalise(np.concatenate([b['image'] for b in batches]), info)[:info.num_eval]
  assert np.bincount(labels).tolist() == SPLIT_COUNTS['test'][5:]
  assert all(y + 5 in ref[p.tobytes()] for p, y in zip(pixels, labels))


def test_per_class_gives_exact_counts(data_dir):
  cfg = _cfg(data_dir, classes=[3, 0], per_class=7)
  info = ip.get_info(cfg)
  assert (info.num_train, info.num_eval) == (14, 36 + 37)  # Evaluation keeps the whole classes.
  batch = next(ip.train_batches(cfg, global_batch_size=14, seed=0))
  assert np.bincount(batch['label']).tolist() == [7, 7]  # One epoch is one batch.


def test_fraction_is_stratified(data_dir):
  info = ip.get_info(_cfg(data_dir, fraction=0.1))
  assert info.num_train == sum(max(1, round(0.1 * n)) for n in SPLIT_COUNTS['train'])


def test_subset_depends_on_subset_seed_only(data_dir):
  def first_batch(**kw):
    cfg = _cfg(data_dir, image_size=8, augment=False, per_class=2, **kw)
    return np.sort(next(ip.train_batches(cfg, global_batch_size=20, seed=0))['image'].ravel())
  np.testing.assert_array_equal(first_batch(), first_batch(subset_seed=0))
  assert not np.array_equal(first_batch(), first_batch(subset_seed=1))


########## Order: determinism and resumption.


def test_stream_is_deterministic_in_the_seed(data_dir):
  cfg = _cfg(data_dir)
  a, b, c = (_take(ip.train_batches(cfg, global_batch_size=32, seed=s), 3) for s in (0, 0, 1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_resume_equals_uninterrupted_stream_across_epochs(data_dir):
  cfg = _cfg(data_dir)
  info = ip.get_info(cfg)
  assert ip.steps_per_epoch(info, 128) == 9
  full = _take(ip.train_batches(cfg, global_batch_size=128, seed=3), 13)
  resumed = _take(ip.train_batches(cfg, global_batch_size=128, seed=3, start_step=7), 6)
  for x, y in zip(full[7:], resumed):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  # A new epoch is a new permutation: no example is repeated inside an epoch.
  epoch = np.concatenate([b['label'] for b in full[:9]])
  assert np.bincount(epoch).sum() == 9 * 128 and np.all(np.bincount(epoch) <= SPLIT_COUNTS['train'])


@pytest.mark.parametrize('hosts', [1, 3])
def test_eval_sees_every_example_once_over_hosts(data_dir, monkeypatch, hosts):
  cfg = _cfg(data_dir, image_size=8, classes=[1, 2, 4])
  info = ip.get_info(cfg)
  seen, lengths = collections.Counter(), set()
  for host in range(hosts):
    _simulate_hosts(monkeypatch, host, hosts)
    batches = list(ip.eval_batches(cfg, global_batch_size=48))
    lengths.add(len(batches))
    for b in batches:
      assert b['image'].shape == (48 // hosts, 8, 8, 3)
      keep = b['mask'] == 1
      seen.update((p.tobytes(), y) for p, y in zip(_unnormalise(b['image'][keep], info),
                                                    b['label'][keep]))
  assert len(lengths) == 1  # Every host runs the same number of eval steps.
  assert sum(seen.values()) == info.num_eval == 36 + 35 + 36
  monkeypatch.undo()
  batches = list(ip.eval_batches(cfg, global_batch_size=48))
  single = collections.Counter()
  for b in batches:
    keep = b['mask'] == 1
    single.update((p.tobytes(), y) for p, y in zip(_unnormalise(b['image'][keep], info),
                                                    b['label'][keep]))
  assert seen == single


def test_train_shards_are_disjoint_over_hosts(data_dir, monkeypatch):
  cfg = _cfg(data_dir, image_size=8, augment=False, classes=[0, 1])
  info = ip.get_info(cfg)
  shards = []
  for host in range(2):
    _simulate_hosts(monkeypatch, host, 2)
    per_epoch = ip.steps_per_epoch(info, 20)
    batches = _take(ip.train_batches(cfg, global_batch_size=20, seed=0), per_epoch)
    shards.append({p.tobytes() for b in batches for p in _unnormalise(b['image'], info)})
  assert not shards[0] & shards[1]


########## cifar10-shaped data through tfds' mock.


def test_mock_cifar10_defaults_and_upscaling(tmp_path):
  with tfds.testing.mock_data(num_examples=24):
    cfg = _cfg(str(tmp_path), name='cifar10')
    info = ip.get_info(cfg)
    assert (info.image_size, info.num_classes, info.mean) == (32, 10, (0.4914, 0.4822, 0.4465))
    batch = next(ip.train_batches(cfg, global_batch_size=8, seed=0))
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    low = (0 - np.array(info.mean)) / np.array(info.std)
    high = (1 - np.array(info.mean)) / np.array(info.std)
    assert np.all(batch['image'] >= low - 1e-5) and np.all(batch['image'] <= high + 1e-5)
    big = next(ip.eval_batches(_cfg(str(tmp_path / 'b'), name='cifar10', image_size=224),
                               global_batch_size=8))
    assert big['image'].shape == (8, 224, 224, 3) and big['mask'].sum() == 8


########## Image folders.


def _write_folder(root, counts):
  rng = np.random.default_rng(0)
  for split, per_class in counts.items():
    for name, n in per_class.items():
      for i in range(n):
        path = root / split / name / f'{i}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tf.io.encode_png(rng.integers(0, 256, (9 + i, 11, 3), np.uint8)).numpy())


def test_folder_dataset(tmp_path):
  _write_folder(tmp_path, {'train': {'cat': 4, 'dog': 3}, 'test': {'cat': 2, 'dog': 3}})
  cfg = _cfg(None, name='folder', folder=str(tmp_path), image_size=16)
  info = ip.get_info(cfg)
  assert (info.class_names, info.num_train, info.num_eval) == (('cat', 'dog'), 7, 5)
  batch = next(ip.train_batches(cfg, global_batch_size=7, seed=0))
  assert batch['image'].shape == (7, 16, 16, 3) and np.bincount(batch['label']).tolist() == [4, 3]
  labels = np.concatenate([b['label'][b['mask'] == 1] for b in
                           ip.eval_batches(cfg, global_batch_size=4)])
  assert np.bincount(labels).tolist() == [2, 3]


def test_folder_errors(tmp_path):
  with pytest.raises(ValueError, match='Cannot read image folder'):
    ip.get_info(_cfg(None, name='folder', folder=str(tmp_path / 'missing')))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='No images found'):
    ip.get_info(_cfg(None, name='folder', folder=str(tmp_path / 'empty')))
  _write_folder(tmp_path, {'flat': {'cat': 1}})  # <folder>/<class>/<image>: no split level.
  with pytest.raises(ValueError, match=r'hold images directly.*train'):
    ip.get_info(_cfg(None, name='folder', folder=str(tmp_path / 'flat')))
  _write_folder(tmp_path / 'bad', {'train': {'cat': 1}, 'test': {'cat': 1}})
  (tmp_path / 'bad' / 'train' / 'cat' / '0.png').write_bytes(b'not a png')
  with pytest.raises(ValueError, match=r'^\S+/bad/train/cat/0.png is not a .png image; convert it '
                                       r'or remove it\.$'):
    ip.get_info(_cfg(None, name='folder', folder=str(tmp_path / 'bad'), image_size=8))
  _write_folder(tmp_path / 'nocat', {'train': {'cat': 1, 'dog': 1}, 'test': {'cat': 1}})
  (tmp_path / 'nocat' / 'train' / 'bird').mkdir()
  with pytest.raises(ValueError, match=r'^Class folder \S+/nocat/train/bird holds no '
                                       r'.png/.jpg/.jpeg image'):
    ip.get_info(_cfg(None, name='folder', folder=str(tmp_path / 'nocat')))
  _write_folder(tmp_path / 'extra', {'train': {'cat': 1}, 'test': {'cat': 1, 'dog': 1}})
  with pytest.raises(ValueError, match=r"^Split 'test' of folder \S+ has class\(es\) \['dog'\] "
                                       r"that 'train' lacks \(e.g. \S+/extra/test/dog\)"):
    ip.get_info(_cfg(None, name='folder', folder=str(tmp_path / 'extra')))


########## Other errors.


@pytest.mark.parametrize('name, close', [('cifar11', 'cifar10'), ('digit', 'digits')])
def test_unknown_dataset_lists_close_names(name, close):
  with pytest.raises(ValueError, match=f'Unknown dataset .*{close}'):
    ip.get_info(_cfg(None, name=name))


def test_offline_fails_at_once_without_trying_to_download(tmp_path, monkeypatch):
  def unreachable(*args, **kwargs):
    raise OSError('Network is unreachable')
  tried = []
  record = lambda *a, **k: tried.append(a)  # stands in for the real download, which would retry
  monkeypatch.setattr(datasets.socket, 'create_connection', unreachable)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', record)
  with pytest.raises(RuntimeError, match=r"'cifar10' is not prepared .*no network: "
                                         r'storage.googleapis.com could not be reached.*tfds build'):
    ip.get_info(_cfg(str(tmp_path), name='cifar10'))
  assert tried == []


def test_offline_download_failure_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, '_online', lambda: True)
  def offline(self, *args, **kwargs):
    raise ConnectionError('no network')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', offline)
  with pytest.raises(RuntimeError, match=r'not prepared .*no network.*tfds build cifar10'):
    ip.get_info(_cfg(str(tmp_path), name='cifar10'))
  with pytest.raises(RuntimeError, match='manual download into data.manual_dir'):
    ip.get_info(_cfg(str(tmp_path), name='imagenet2012'))
  with pytest.raises(ValueError, match='data.download is False'):
    ip.get_info(_cfg(str(tmp_path / 'x'), name='cifar100', download=False))


def test_view_errors(data_dir):
  with pytest.raises(ValueError, match='class 8 has only 122 examples'):
    ip.get_info(_cfg(data_dir, classes=[1, 8], per_class=125))
  with pytest.raises(ValueError, match=r'\[12\] are not'):
    ip.get_info(_cfg(data_dir, classes=[1, 12]))
  with pytest.raises(ValueError, match="no split 'valid'; it has"):
    ip.get_info(_cfg(data_dir, eval_split='valid'))


def test_batch_size_must_divide_over_hosts(data_dir, monkeypatch):
  _simulate_hosts(monkeypatch, 0, 4)
  with pytest.raises(ValueError, match='multiple of 4, e.g. 128 or 132'):
    next(ip.train_batches(_cfg(data_dir), global_batch_size=130, seed=0))
  with pytest.raises(ValueError, match='exceeds the 1259 training examples'):
    next(ip.train_batches(_cfg(data_dir), global_batch_size=2048, seed=0))
