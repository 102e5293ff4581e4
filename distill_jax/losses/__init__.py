"""Per-example distillation losses between student and teacher logits."""

from distill_jax.losses.divergences import DIVERGENCES
from distill_jax.losses.divergences import DistillationLoss
from distill_jax.losses.divergences import forward_kl
from distill_jax.losses.divergences import generalized_jsd
from distill_jax.losses.divergences import logit_mse
from distill_jax.losses.divergences import LossTerms
from distill_jax.losses.divergences import masked_mean
from distill_jax.losses.divergences import reverse_kl
from distill_jax.losses.divergences import skew_kl
from distill_jax.losses.divergences import softmax_cross_entropy_with_integer_labels
from distill_jax.losses.divergences import total_variation

__all__ = [
    "DIVERGENCES",
    "DistillationLoss",
    "LossTerms",
    "forward_kl",
    "generalized_jsd",
    "logit_mse",
    "masked_mean",
    "reverse_kl",
    "skew_kl",
    "softmax_cross_entropy_with_integer_labels",
    "total_variation",
]
