"""Test set-up: 8 simulated CPU devices and one Fashion-MNIST build per session."""

import os

# Must be set before JAX initializes its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def tfds_data_dir(tmp_path_factory) -> str:
  """A TFDS data directory with Fashion-MNIST built from the Debian files."""
  from distill_jax import data  # pylint: disable=g-import-not-at-top

  if not os.path.isdir(FASHION_MNIST_DIR):
    pytest.skip(f"{FASHION_MNIST_DIR} is missing; apt-get install dataset-fashion-mnist")
  data_dir = str(tmp_path_factory.mktemp("tensorflow_datasets"))
  data.load_image_splits(source="debian", data_dir=data_dir, fashion_mnist_dir=FASHION_MNIST_DIR)
  return data_dir


@pytest.fixture(scope="session")
def fashion_mnist_splits(tfds_data_dir):
  from distill_jax import data  # pylint: disable=g-import-not-at-top

  return data.load_image_splits(source="debian", data_dir=tfds_data_dir,
                                fashion_mnist_dir=FASHION_MNIST_DIR)
