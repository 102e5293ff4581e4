"""A Gemma 3 decoder in Flax NNX, at any size set by `Gemma3Config`.

The architecture follows the Gemma 3 technical report (Gemma Team, 2025) and
the Hugging Face `transformers` implementation `Gemma3ForCausalLM`, whose
parameter layout the importers in `distill_jax.checkpoints` read:

- grouped-query attention with RMS-normalized queries and keys (QK-norm);
- local layers with a sliding attention window and global layers with full
  causal attention, each with its own rotary base;
- RMSNorm before and after both the attention and the MLP blocks, with the
  scale stored as an offset from 1 (`y = x_normed * (1 + scale)`);
- a gated MLP with the tanh approximation of GELU;
- an input embedding scaled by `sqrt(d_model)` and tied to the output layer;
- optional soft-capping `cap * tanh(x / cap)` of attention and final logits.

Packed sequences are supported through `segment_ids`: a token attends only to
earlier tokens of its own segment, and `positions` restart in each segment.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
  """Sizes and constants of a Gemma 3 decoder.

  Attributes:
    vocab_size: rows of the tied embedding table.
    d_model: width of the residual stream.
    num_layers: number of decoder blocks.
    num_heads: query heads per layer.
    num_kv_heads: key and value heads per layer; `num_heads` must be a multiple.
    head_dim: width of each attention head.
    mlp_dim: hidden width of the gated MLP.
    sliding_window: number of keys a query of a local layer attends to, its own
      position included.
    global_every: layer `i` is global when `(i + 1) % global_every == 0`, so
      the default of 6 gives five local layers then one global layer.
    rope_local_base: rotary base of local layers.
    rope_global_base: rotary base of global layers.
    rope_global_scale: linear position scaling of global layers (1 disables it).
    query_pre_attn_scalar: queries are scaled by `query_pre_attn_scalar**-0.5`.
    attn_logit_softcap: soft cap of attention scores, or None.
    final_logit_softcap: soft cap of output logits, or None.
    rms_norm_eps: epsilon inside every RMSNorm.
    max_seq_len: maximum sequence length the model was trained for.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  sliding_window: int = 512
  global_every: int = 6
  rope_local_base: float = 10_000.0
  rope_global_base: float = 1_000_000.0
  rope_global_scale: float = 1.0
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  rms_norm_eps: float = 1e-6
  max_seq_len: int = 32_768

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "mlp_dim", "sliding_window", "global_every", "max_seq_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Gemma3Config.{name} must be an integer >= 1, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"Gemma3Config.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"Gemma3Config.head_dim must be even for rotary embeddings, "
                       f"got {self.head_dim}")

  def is_global_layer(self, layer: int) -> bool:
    return (layer + 1) % self.global_every == 0

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple("global" if self.is_global_layer(i) else "local"
                 for i in range(self.num_layers))


# Gemma 3 270M as released by Google. The GGUF importer reads the same values
# from the file's metadata.
GEMMA3_270M = Gemma3Config(vocab_size=262_144, d_model=640, num_layers=18, num_heads=4,
                           num_kv_heads=1, head_dim=256, mlp_dim=2048)


class DecoderOutput(NamedTuple):
  """Outputs of `Gemma3Decoder.__call__`.

  Attributes:
    logits: `[batch, length, vocab]` output logits, or None when the caller
      asked for hidden states only (the chunked token losses compute logits a
      vocabulary slice at a time from `hidden` and the embedding table).
    hidden: `[batch, length, d_model]` final hidden states after the last norm.
    hidden_states: the residual stream entering each layer and after the last
      one (`num_layers + 1` arrays), when requested, else an empty tuple.
    attention_weights: `[batch, heads, length, length]` softmax weights of each
      layer, when requested, else an empty tuple.
  """

  logits: jax.Array | None
  hidden: jax.Array
  hidden_states: tuple[jax.Array, ...] = ()
  attention_weights: tuple[jax.Array, ...] = ()


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
  """Return `cap * tanh(x / cap)`, or `x` unchanged when `cap` is None."""
  if cap is None:
    return x
  return cap * jnp.tanh(x / cap)


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float,
                     scale: float = 1.0) -> jax.Array:
  """Rotate `x` `[batch, length, heads, head_dim]` by `positions` `[batch, length]`.

  Uses the half-split layout of `transformers` (the first and second halves of
  each head form the rotated pairs), which is also how GGUF stores Gemma.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = (positions.astype(jnp.float32)[..., None] / scale) * inv_freq
  angles = angles[:, :, None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)

  x = x.astype(jnp.float32)
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def attention_mask(segment_ids: jax.Array, positions: jax.Array,
                   sliding_window: int | None) -> jax.Array:
  """Return the boolean `[batch, 1, length, length]` mask of allowed query-key pairs.

  A query attends to keys at the same or earlier positions of its own
  segment, and with a `sliding_window` only to the last `sliding_window` of
  them. Segment id 0 marks padding, which attends only to itself so that its
  softmax stays finite.
  """
  query_segments = segment_ids[:, :, None]
  key_segments = segment_ids[:, None, :]
  query_positions = positions[:, :, None]
  key_positions = positions[:, None, :]

  length = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
  mask = causal & (query_segments == key_segments)
  if sliding_window is not None:
    mask &= (query_positions - key_positions) < sliding_window

  is_padding = (segment_ids == 0)[:, :, None]
  mask = jnp.where(is_padding, jnp.eye(length, dtype=bool)[None], mask)
  return mask[:, None]


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a zero-initialized scale offset from 1."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query self-attention with QK-norm and rotary embeddings."""

  def __init__(self, config: Gemma3Config, layer: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    d, heads, kv_heads, head_dim = (config.d_model, config.num_heads, config.num_kv_heads,
                                    config.head_dim)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0,
                                             out_axis=(1, 2))
    out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1),
                                                 out_axis=2)
    self.q_proj = nnx.Param(init(rngs.params(), (d, heads, head_dim), param_dtype))
    self.k_proj = nnx.Param(init(rngs.params(), (d, kv_heads, head_dim), param_dtype))
    self.v_proj = nnx.Param(init(rngs.params(), (d, kv_heads, head_dim), param_dtype))
    self.o_proj = nnx.Param(out_init(rngs.params(), (heads, head_dim, d), param_dtype))
    self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, param_dtype=param_dtype)
    self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, param_dtype=param_dtype)

    self.is_global = config.is_global_layer(layer)
    self.rope_base = config.rope_global_base if self.is_global else config.rope_local_base
    self.rope_scale = config.rope_global_scale if self.is_global else 1.0
    self.sliding_window = None if self.is_global else config.sliding_window
    self.query_scale = config.query_pre_attn_scalar ** -0.5
    self.attn_logit_softcap = config.attn_logit_softcap
    self.groups = heads // kv_heads

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Return the attention output `[batch, length, d_model]` and its weights."""
    query = jnp.einsum("bld,dhk->blhk", x, self.q_proj[...])
    key = jnp.einsum("bld,dhk->blhk", x, self.k_proj[...])
    value = jnp.einsum("bld,dhk->blhk", x, self.v_proj[...])

    query = rotary_embedding(self.q_norm(query), positions, self.rope_base, self.rope_scale)
    key = rotary_embedding(self.k_norm(key), positions, self.rope_base, self.rope_scale)
    key = jnp.repeat(key, self.groups, axis=2)
    value = jnp.repeat(value, self.groups, axis=2)

    scores = jnp.einsum("bqhk,bshk->bhqs", query * self.query_scale, key,
                        preferred_element_type=jnp.float32)
    scores = soft_cap(scores, self.attn_logit_softcap)
    mask = attention_mask(segment_ids, positions, self.sliding_window)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)

    attended = jnp.einsum("bhqs,bshk->bqhk", weights.astype(value.dtype), value)
    output = jnp.einsum("bqhk,hkd->bqd", attended, self.o_proj[...])
    return output, weights


class GatedMLP(nnx.Module):
  """`down(gelu_tanh(gate(x)) * up(x))`."""

  def __init__(self, d_model: int, mlp_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    self.gate_proj = nnx.Param(init(rngs.params(), (d_model, mlp_dim), param_dtype))
    self.up_proj = nnx.Param(init(rngs.params(), (d_model, mlp_dim), param_dtype))
    self.down_proj = nnx.Param(init(rngs.params(), (mlp_dim, d_model), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = jax.nn.gelu(x @ self.gate_proj[...], approximate=True)
    return (gate * (x @ self.up_proj[...])) @ self.down_proj[...]


class DecoderBlock(nnx.Module):
  """One Gemma 3 layer: normed attention and normed MLP, each added to the residual."""

  def __init__(self, config: Gemma3Config, layer: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    eps = config.rms_norm_eps
    self.pre_attention_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)
    self.attention = Attention(config, layer, rngs=rngs, param_dtype=param_dtype)
    self.post_attention_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)
    self.pre_ffw_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)
    self.mlp = GatedMLP(config.d_model, config.mlp_dim, rngs=rngs, param_dtype=param_dtype)
    self.post_ffw_norm = RMSNorm(config.d_model, eps, param_dtype=param_dtype)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    attended, weights = self.attention(self.pre_attention_norm(x), positions, segment_ids)
    x = x + self.post_attention_norm(attended)
    x = x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))
    return x, weights


class Gemma3Decoder(nnx.Module):
  """A Gemma 3 causal language model with tied input and output embeddings."""

  def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               remat: bool = False):
    """Build the decoder with freshly initialized parameters.

    Args:
      config: the sizes and constants of the model.
      rngs: source of the parameter initializers' keys.
      param_dtype: dtype of every parameter.
      remat: recompute each layer's activations in the backward pass instead
        of storing them, trading compute for memory.
    """
    self.config = config
    embed_init = nnx.initializers.normal(stddev=1.0 / math.sqrt(config.d_model))
    self.embedding = nnx.Param(
        embed_init(rngs.params(), (config.vocab_size, config.d_model), param_dtype))
    self.layers = nnx.List([
        DecoderBlock(config, layer, rngs=rngs, param_dtype=param_dtype)
        for layer in range(config.num_layers)
    ])
    self.final_norm = RMSNorm(config.d_model, config.rms_norm_eps, param_dtype=param_dtype)
    self.remat = remat

  def embed(self, tokens: jax.Array) -> jax.Array:
    embedding = self.embedding[...]
    scale = jnp.asarray(math.sqrt(self.config.d_model), embedding.dtype)
    return jnp.take(embedding, tokens, axis=0) * scale

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """Project final hidden states `[..., d_model]` to soft-capped float32 logits."""
    logits = jnp.einsum("...d,vd->...v", hidden, self.embedding[...],
                        preferred_element_type=jnp.float32)
    return soft_cap(logits, self.config.final_logit_softcap)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, *, return_logits: bool = True,
               return_hidden_states: bool = False,
               return_attention_weights: bool = False) -> DecoderOutput:
    """Run the decoder on `tokens` `[batch, length]`.

    Args:
      tokens: integer token ids.
      positions: position of each token within its segment; defaults to
        `0..length-1` in every row.
      segment_ids: positive id of the packed sequence each token belongs to,
        0 for padding; defaults to one segment per row.
      return_logits: compute `[batch, length, vocab]` logits. Token losses that
        work a vocabulary chunk at a time pass False and use `hidden`.
      return_hidden_states: also return the residual stream around each layer.
      return_attention_weights: also return every layer's attention weights.
    """
    batch, length = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)

    x = self.embed(tokens)
    hidden_states, attention_weights = [], []
    for block in self.layers:
      if return_hidden_states:
        hidden_states.append(x)
      if self.remat:
        x, weights = nnx.remat(lambda blk, h: blk(h, positions, segment_ids))(block, x)
      else:
        x, weights = block(x, positions, segment_ids)
      if return_attention_weights:
        attention_weights.append(weights)
    if return_hidden_states:
      hidden_states.append(x)

    hidden = self.final_norm(x)
    logits = self.logits_from_hidden(hidden) if return_logits else None
    return DecoderOutput(logits, hidden, tuple(hidden_states), tuple(attention_weights))


def count_parameters(model: nnx.Module) -> int:
  """Return the number of scalar parameters of `model`."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
