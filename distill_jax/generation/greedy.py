"""Greedy decoding over a fixed-size token buffer, compiled once per model.

NOTE: the decoder has no key-value cache yet, so every new token reruns it
over the whole buffer. The per-token latency measured here is therefore that
of a full forward pass of `buffer_length` tokens, not of one cached step.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0,))
def _next_token(graphdef: nnx.GraphDef, params: nnx.State, buffer: jax.Array,
                length: jax.Array) -> jax.Array:
  """Return the greedy next token after the first `length` tokens of `buffer` `[1, buffer]`."""
  model = nnx.merge(graphdef, params)
  positions = jnp.arange(buffer.shape[1], dtype=jnp.int32)[None]
  segment_ids = (positions < length).astype(jnp.int32)
  hidden = model(buffer, positions, segment_ids, return_logits=False).hidden
  last = jax.lax.dynamic_index_in_dim(hidden[0], length - 1, keepdims=False)
  return jnp.argmax(model.logits_from_hidden(last)).astype(jnp.int32)


def greedy_continuation(graphdef: nnx.GraphDef, params: nnx.State, prompt_ids: list[int], *,
                        max_new_tokens: int, buffer_length: int, eos_id: int
                        ) -> tuple[list[int], float]:
  """Greedily extend `prompt_ids` by up to `max_new_tokens`, stopping after EOS.

  Returns:
    The new token ids and the median seconds per new token.
  """
  if len(prompt_ids) + max_new_tokens > buffer_length:
    raise ValueError(f"prompt of {len(prompt_ids)} tokens plus {max_new_tokens} new tokens "
                     f"exceeds the buffer of {buffer_length}")
  buffer = np.zeros((1, buffer_length), np.int32)
  buffer[0, :len(prompt_ids)] = prompt_ids
  length = len(prompt_ids)
  _next_token(graphdef, params, jnp.asarray(buffer), jnp.int32(length)).block_until_ready()

  new_ids, seconds = [], []
  for _ in range(max_new_tokens):
    started = time.perf_counter()
    token = int(_next_token(graphdef, params, jnp.asarray(buffer), jnp.int32(length)))
    seconds.append(time.perf_counter() - started)
    new_ids.append(token)
    buffer[0, length] = token
    length += 1
    if token == eos_id:
      break
  return new_ids, float(np.median(seconds)) if seconds else 0.0
