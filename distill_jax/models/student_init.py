"""Initialize a Gemma 3 student from its teacher's weights."""

import dataclasses

from absl import logging
import jax.numpy as jnp
from flax import nnx

from distill_jax.errors import ConfigError
from distill_jax.models.gemma3 import Gemma3Config
from distill_jax.models.gemma3 import Gemma3Decoder

# Fields that must match for a teacher layer to be copied into the student.
_LAYER_SHAPE_FIELDS = ("vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                       "mlp_dim")


def teacher_layers_to_copy(teacher_layers: int, student_layers: int) -> list[int]:
  """Return the teacher layer copied into each student layer: every k-th, from layer 0.

  With `k = teacher_layers // student_layers`, student layer `j` gets teacher
  layer `j * k`, so 18 teacher layers and 6 student layers give 0, 3, ..., 15.
  """
  if student_layers > teacher_layers:
    raise ConfigError(f"student.num_layers ({student_layers}) exceeds the teacher's "
                      f"{teacher_layers} layers; it cannot be initialized from the teacher")
  stride = teacher_layers // student_layers
  return [j * stride for j in range(student_layers)]


def init_student_from_teacher(teacher: Gemma3Decoder, student_config: Gemma3Config, *,
                              param_dtype=jnp.float32) -> Gemma3Decoder:
  """Build a student that copies the teacher's embedding, final norm and every k-th layer.

  Raises:
    ConfigError: when the student's widths or vocabulary differ from the
      teacher's, naming each differing field.
  """
  teacher_config = teacher.config
  differing = [f"{name} (teacher {getattr(teacher_config, name)}, student "
               f"{getattr(student_config, name)})" for name in _LAYER_SHAPE_FIELDS
               if getattr(teacher_config, name) != getattr(student_config, name)]
  if differing:
    raise ConfigError("student.init='teacher' needs the teacher's widths, but these differ: "
                      + ", ".join(differing) + "; change them or set student.init='scratch'")

  layers = teacher_layers_to_copy(teacher_config.num_layers, student_config.num_layers)
  student = nnx.eval_shape(lambda: Gemma3Decoder(student_config, rngs=nnx.Rngs(0),
                                                 param_dtype=param_dtype))
  teacher_params = nnx.to_flat_state(nnx.state(teacher, nnx.Param))
  student_params = dict(nnx.to_flat_state(nnx.state(student, nnx.Param)))
  teacher_values = {path: variable for path, variable in teacher_params}

  for path, variable in student_params.items():
    source = path
    if path[0] == "layers":
      source = ("layers", layers[path[1]]) + path[2:]
    variable.set_value(jnp.asarray(teacher_values[source][...], param_dtype))

  logging.info("initialized the %d-layer student from teacher layers %s", len(layers), layers)
  return student


def student_config_from(base: Gemma3Config, **overrides) -> Gemma3Config:
  """Return `base` with `overrides` applied, for building a smaller student config."""
  return dataclasses.replace(base, **overrides)
