"""The embedded default dataset: scikit-learn's handwritten digits as a tfds builder named `digits`.

The data are the 1,797 8x8 grey-level digits of the UCI "Optical Recognition of Handwritten Digits"
set (Alpaydin & Kaynak, 1998) that scikit-learn bundles (`sklearn.datasets.load_digits`), so the
builder needs no network: `tfds.builder('digits').download_and_prepare()` writes the TFRecords into
the data dir in a few seconds and every default config trains on it.

Images are stored as uint8 grayscale (8, 8, 1), pixel values 0..16 scaled to 0..255 (rounded);
`id` is the row in `load_digits()`, so any example can be traced back to scikit-learn's arrays.

Splits are stratified and deterministic: within each class the examples are permuted with a fixed
seed, 20% (rounded) go to `test`, 10% (rounded) to `validation`, the rest to `train`:

  split        total   per class 0..9
  train        1,259   124 128 124 128 127 128 127 125 122 126
  validation     179    18  18  18  18  18  18  18  18  17  18
  test           359    36  36  35  37  36  36  36  36  35  36
"""

from etils import epath
import numpy as np
from sklearn import datasets
import tensorflow_datasets as tfds

SPLIT_SEED = 0
SPLIT_FRACTIONS = {'test': 0.2, 'validation': 0.1}  # `train` receives the remainder.


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Stratified split of example indices: {'train', 'validation', 'test'} -> sorted indices."""
  rng = np.random.default_rng(SPLIT_SEED)
  parts = {'train': [], 'validation': [], 'test': []}
  for c in range(int(labels.max()) + 1):
    members = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(np.round(SPLIT_FRACTIONS['test'] * len(members)))
    n_val = int(np.round(SPLIT_FRACTIONS['validation'] * len(members)))
    parts['test'].append(members[:n_test])
    parts['validation'].append(members[n_test:n_test + n_val])
    parts['train'].append(members[n_test + n_val:])
  return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


def to_uint8(images: np.ndarray) -> np.ndarray:
  """scikit-learn's 0..16 float pixels -> uint8 0..255, shape (N, 8, 8, 1)."""
  return np.round(images * (255.0 / 16.0)).astype(np.uint8)[..., None]


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits, 10 classes, built offline."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 70/10/20 splits of sklearn.datasets.load_digits.'}
  # tfds 4.9.10 finds a builder's source through the `importlib_resources` package, which it does
  # not install (tensorflow/datasets#11212); naming the file directly needs nothing extra.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            'id': tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything ships with scikit-learn.
    data = datasets.load_digits()
    images, labels = to_uint8(data.images), data.target.astype(np.int64)
    return {name: self._generate_examples(images, labels, idx)
            for name, idx in split_indices(labels).items()}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {'image': images[i], 'label': labels[i], 'id': np.int32(i)}
