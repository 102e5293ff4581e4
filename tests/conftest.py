"""Test set-up: 8 simulated CPU devices and one Fashion-MNIST build per session."""

import os
import subprocess
import sys

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


def run_cli(*args: str, executable: list[str] | None = None) -> subprocess.CompletedProcess:
  """Run the command line in a child process and return its exit code and output."""
  command = (executable or [sys.executable, "-m", "distill_jax.main"]) + list(args)
  return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                        check=False)


@pytest.fixture(scope="session")
def gemma_gguf() -> str:
  """The path of the packaged Gemma 3 270M GGUF file."""
  from distill_jax.checkpoints import gemma3_import  # pylint: disable=g-import-not-at-top

  return gemma3_import.default_gemma3_270m_gguf()


@pytest.fixture(scope="session")
def tiny_run(tfds_data_dir, tmp_path_factory):
  """A finished run of the tiny classification recipe: (workdir, its flags, the result)."""
  workdir = tmp_path_factory.mktemp("tiny_run")
  args = ("--config=configs/fashion_mnist_kd.py:tiny", f"--workdir={workdir}",
          f"--config.data.data_dir={tfds_data_dir}")
  first = run_cli(*args)
  return workdir, args, first
