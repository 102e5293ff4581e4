"""clu metric collections for the train step and their TensorBoard names."""

import flax
from clu import metrics


@flax.struct.dataclass
class SupervisedMetrics(metrics.Collection):
  """Metrics of a step trained on hard labels only (teacher and baseline stages)."""
  loss: metrics.Average.from_output("loss")
  cross_entropy: metrics.Average.from_output("cross_entropy")
  accuracy: metrics.Average.from_output("accuracy")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")


# clu builds a collection from its own annotations only, so the supervised
# fields are repeated here rather than inherited.
@flax.struct.dataclass
class DistillMetrics(metrics.Collection):
  """Metrics of a distillation step: the supervised ones plus the teacher terms."""
  loss: metrics.Average.from_output("loss")
  cross_entropy: metrics.Average.from_output("cross_entropy")
  accuracy: metrics.Average.from_output("accuracy")
  grad_norm: metrics.Average.from_output("grad_norm")
  learning_rate: metrics.LastValue.from_output("learning_rate")
  divergence: metrics.Average.from_output("divergence")
  teacher_agreement: metrics.Average.from_output("teacher_agreement")


# Names under which each collection field is written, by namespace.
METRIC_NAMES = {
    "loss": "train/loss",
    "cross_entropy": "train/cross_entropy",
    "accuracy": "train/accuracy",
    "grad_norm": "train/grad_norm",
    "learning_rate": "train/learning_rate",
    "divergence": "distill/divergence",
    "teacher_agreement": "distill/teacher_agreement",
    "target_tokens": "train/target_tokens",
}


def namespaced(computed: dict[str, float]) -> dict[str, float]:
  """Rename computed collection fields to their `train/` and `distill/` names."""
  return {METRIC_NAMES.get(name, name): value for name, value in computed.items()}
