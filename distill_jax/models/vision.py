"""Image classifiers in Flax NNX: a ResNet-style teacher and two small students.

Every model maps images `[batch, height, width, channels]` (float32) to logits
`[batch, num_classes]` and has no state but its parameters, so the same pure
train step serves all of them. The ResNet uses GroupNorm rather than BatchNorm
for that reason: it needs no running statistics.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class ResidualBlock(nnx.Module):
  """Two 3x3 convolutions with GroupNorm and an identity or 1x1 shortcut."""

  def __init__(self, in_channels: int, out_channels: int, strides: int, num_groups: int,
               *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_channels, out_channels, (3, 3), strides=strides, use_bias=False,
                          rngs=rngs)
    self.norm1 = nnx.GroupNorm(out_channels, num_groups=num_groups, rngs=rngs)
    self.conv2 = nnx.Conv(out_channels, out_channels, (3, 3), use_bias=False, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_channels, num_groups=num_groups,
                               scale_init=nnx.initializers.zeros, rngs=rngs)
    if strides != 1 or in_channels != out_channels:
      self.shortcut = nnx.Conv(in_channels, out_channels, (1, 1), strides=strides,
                               use_bias=False, rngs=rngs)
    else:
      self.shortcut = None

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x if self.shortcut is None else self.shortcut(x)
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return nnx.relu(y + residual)


class ResNet(nnx.Module):
  """A ResNet-style CNN: a 3x3 stem, then stages that halve the resolution.

  The second norm of each block starts at zero scale, so every block starts
  as the identity, which lets a deep network train fast from the first step.
  """

  def __init__(self, in_channels: int, num_classes: int, stage_widths: Sequence[int],
               blocks_per_stage: int, image_size: tuple[int, int], head: str = "pool",
               *, rngs: nnx.Rngs):
    """Build the network.

    Args:
      in_channels: channels of the input images.
      num_classes: number of output logits.
      stage_widths: output channels of each stage; every stage after the first
        halves the height and width.
      blocks_per_stage: residual blocks per stage.
      image_size: (height, width) of the input images.
      head: "pool" averages the last feature map over space before the linear
        classifier. "flatten" feeds it every position, so the classifier
        also sees where a feature is, which suits small images such as 28x28.
      rngs: parameter initialization keys.
    """
    if head not in ("pool", "flatten"):
      raise ValueError(f"unknown ResNet head {head!r}; expected 'pool' or 'flatten'")
    self.head_type = head
    num_groups = min(8, stage_widths[0])
    self.stem = nnx.Conv(in_channels, stage_widths[0], (3, 3), use_bias=False, rngs=rngs)
    self.stem_norm = nnx.GroupNorm(stage_widths[0], num_groups=num_groups, rngs=rngs)

    blocks = []
    channels = stage_widths[0]
    for stage_index, width in enumerate(stage_widths):
      for block_index in range(blocks_per_stage):
        strides = 2 if stage_index > 0 and block_index == 0 else 1
        blocks.append(ResidualBlock(channels, width, strides, min(8, width), rngs=rngs))
        channels = width
    self.blocks = nnx.List(blocks)

    height, width = image_size
    for _ in stage_widths[1:]:
      height, width = (height + 1) // 2, (width + 1) // 2
    features = channels if head == "pool" else height * width * channels
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = nnx.relu(self.stem_norm(self.stem(images)))
    for block in self.blocks:
      x = block(x)
    if self.head_type == "pool":
      x = jnp.mean(x, axis=(1, 2))
    else:
      x = x.reshape(x.shape[0], -1)
    return self.head(x)


class SmallCNN(nnx.Module):
  """Convolution, ReLU and 2x2 max-pooling per width, then one linear layer."""

  def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int],
               image_size: tuple[int, int], *, rngs: nnx.Rngs):
    convs = []
    channels = in_channels
    for width in widths:
      convs.append(nnx.Conv(channels, width, (3, 3), rngs=rngs))
      channels = width
    self.convs = nnx.List(convs)

    height, width = image_size
    for _ in widths:
      height, width = height // 2, width // 2
    self.head = nnx.Linear(height * width * channels, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images
    for conv in self.convs:
      x = nnx.relu(conv(x))
      x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.head(x)


class MLP(nnx.Module):
  """A multilayer perceptron over flattened pixels with ReLU hidden layers."""

  def __init__(self, in_features: int, num_classes: int, hidden_sizes: Sequence[int],
               *, rngs: nnx.Rngs):
    layers = []
    features = in_features
    for size in hidden_sizes:
      layers.append(nnx.Linear(features, size, rngs=rngs))
      features = size
    self.hidden = nnx.List(layers)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.reshape(images.shape[0], -1)
    for layer in self.hidden:
      x = nnx.relu(layer(x))
    return self.head(x)
