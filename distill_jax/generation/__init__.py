"""Text generation from decoder language models."""

from distill_jax.generation.greedy import greedy_continuation

__all__ = ["greedy_continuation"]
