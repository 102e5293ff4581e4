"""distill_jax: knowledge distillation in JAX, Flax, Optax and Orbax."""

__version__ = "0.1.0"
