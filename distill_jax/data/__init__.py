"""Image datasets stored as TFDS ArrayRecord files and Grain input pipelines."""

from distill_jax.data.image_datasets import FASHION_MNIST_CLASS_NAMES
from distill_jax.data.image_datasets import FASHION_MNIST_DEBIAN_DIR
from distill_jax.data.image_datasets import FashionMnistOffline
from distill_jax.data.image_datasets import ImageSplits
from distill_jax.data.image_datasets import load_image_splits
from distill_jax.data.image_datasets import MnistSubsetOffline
from distill_jax.data.image_datasets import prepare_fashion_mnist_offline
from distill_jax.data.image_datasets import prepare_mnist_subset_offline
from distill_jax.data.image_datasets import read_idx_images
from distill_jax.data.image_datasets import read_idx_labels
from distill_jax.data.image_datasets import SOURCES
from distill_jax.data.pipeline import InMemorySource
from distill_jax.data.pipeline import iterate_eval_batches
from distill_jax.data.pipeline import iterator_restore_args
from distill_jax.data.pipeline import iterator_save_args
from distill_jax.data.pipeline import load_into_memory
from distill_jax.data.pipeline import make_train_loader
from distill_jax.data.pipeline import scale_batch

__all__ = [
    'FASHION_MNIST_CLASS_NAMES',
    'FASHION_MNIST_DEBIAN_DIR',
    'FashionMnistOffline',
    'ImageSplits',
    'InMemorySource',
    'MnistSubsetOffline',
    'SOURCES',
    'iterate_eval_batches',
    'iterator_restore_args',
    'iterator_save_args',
    'load_image_splits',
    'load_into_memory',
    'make_train_loader',
    'prepare_fashion_mnist_offline',
    'prepare_mnist_subset_offline',
    'read_idx_images',
    'read_idx_labels',
    'scale_batch',
]
