"""Build a model from its config section."""

from collections.abc import Mapping
from typing import Any

from flax import nnx

from distill_jax.models import vision

MODEL_NAMES = ("resnet", "cnn", "mlp")


def build_model(model_config: Mapping[str, Any], image_shape: tuple[int, int, int],
                num_classes: int, seed: int) -> nnx.Module:
  """Build the model named by `model_config["name"]` with freshly initialized parameters.

  Args:
    model_config: a config section with `name` and the size fields of that model:
      `stage_widths`, `blocks_per_stage` and `head` for "resnet", `widths` for "cnn",
      `hidden_sizes` for "mlp".
    image_shape: (height, width, channels) of the input images.
    num_classes: number of output logits.
    seed: seed of the parameter initializers.
  """
  rngs = nnx.Rngs(params=seed)
  height, width, channels = image_shape
  name = model_config["name"]

  if name == "resnet":
    return vision.ResNet(channels, num_classes, tuple(model_config["stage_widths"]),
                         int(model_config["blocks_per_stage"]), (height, width),
                         head=model_config.get("head", "pool"), rngs=rngs)
  if name == "cnn":
    return vision.SmallCNN(channels, num_classes, tuple(model_config["widths"]),
                           (height, width), rngs=rngs)
  if name == "mlp":
    return vision.MLP(height * width * channels, num_classes,
                      tuple(model_config["hidden_sizes"]), rngs=rngs)
  raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
