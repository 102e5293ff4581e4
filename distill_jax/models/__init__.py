"""Flax NNX models and the factory that builds them from a config."""

from distill_jax.models.registry import MODEL_NAMES, build_model
from distill_jax.models.vision import MLP, ResNet, SmallCNN

__all__ = ["MLP", "MODEL_NAMES", "ResNet", "SmallCNN", "build_model"]
