"""Tests of the Gemma 3 decoder, its GGUF and safetensors importers and its tokenizer."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill_jax.checkpoints import gemma3_import
from distill_jax.data import tokenizer as tokenizer_lib
from distill_jax.data import vocabulary
from distill_jax.errors import CheckpointFileError
from distill_jax.errors import ConfigError
from distill_jax.models import gemma3
from distill_jax.models import student_init

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "gemma3_270m_parity.npz")
PARITY_TOLERANCE = 1e-3

TINY = gemma3.Gemma3Config(vocab_size=96, d_model=32, num_layers=4, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=48, sliding_window=3,
                           global_every=2, rope_local_base=100.0, rope_global_base=1000.0,
                           final_logit_softcap=30.0, max_seq_len=64)


def _tiny_model(seed: int = 0, config: gemma3.Gemma3Config = TINY) -> gemma3.Gemma3Decoder:
  model = gemma3.Gemma3Decoder(config, rngs=nnx.Rngs(seed))
  # Norm scales start at zero; random offsets make the import tests see them.
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "scale":
      key = jax.random.fold_in(jax.random.key(seed), hash(path) % 1000)
      variable.set_value(0.1 * jax.random.normal(key, variable.shape))
  return model


def _tokens(seed: int = 0, length: int = 10, batch: int = 2) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, TINY.vocab_size)


# --- the pretrained model --------------------------------------------------


@pytest.fixture(scope="module")
def gemma3_270m():
  path = gemma3_import.default_gemma3_270m_gguf()
  config, model = gemma3_import.load_gemma3_gguf(path)
  return path, config, model


@pytest.fixture(scope="module")
def gemma3_270m_tokenizer(gemma3_270m):
  return tokenizer_lib.tokenizer_from_gguf(gemma3_270m[0])


def test_gguf_config_is_gemma3_270m(gemma3_270m):
  _, config, model = gemma3_270m
  assert config == gemma3.GEMMA3_270M
  assert gemma3.count_parameters(model) == 268_098_176


def test_parity_with_transformers_fixture(gemma3_270m):
  _, _, model = gemma3_270m
  fixture = np.load(FIXTURE)
  forward = nnx.jit(lambda m, tokens: m(tokens).logits)
  assert len(fixture["prompts"]) >= 5

  for i in range(len(fixture["prompts"])):
    tokens = jnp.asarray(fixture[f"tokens_{i}"])[None]
    logits = np.asarray(forward(model, tokens))[0].astype(np.float64)
    stride_error = np.abs(logits[:, fixture["stride_ids"]] - fixture[f"stride_logits_{i}"])
    top = np.take_along_axis(logits, fixture[f"top_ids_{i}"], -1)
    top_error = np.abs(top - fixture[f"top_logits_{i}"])
    maximum = logits.max(-1, keepdims=True)
    logsumexp = maximum[:, 0] + np.log(np.exp(logits - maximum).sum(-1))
    logsumexp_error = np.abs(logsumexp - fixture[f"logsumexp_{i}"])

    assert stride_error.max() <= PARITY_TOLERANCE, f"prompt {i}"
    assert top_error.max() <= PARITY_TOLERANCE, f"prompt {i}"
    assert logsumexp_error.max() <= PARITY_TOLERANCE, f"prompt {i}"
    np.testing.assert_array_equal(np.argmax(logits, -1), fixture[f"top_ids_{i}"][:, 0])


def test_tokenizer_matches_transformers_fixture(gemma3_270m_tokenizer):
  fixture = np.load(FIXTURE)
  for i, prompt in enumerate(fixture["prompts"]):
    assert gemma3_270m_tokenizer.encode(str(prompt)) == fixture[f"tokens_{i}"].tolist()


def test_tokenizer_space_runs_carry_marker(gemma3_270m_tokenizer):
  tokenizer = gemma3_270m_tokenizer
  assert tokenizer.id_to_piece(138) == "\u2581\u2581"
  assert tokenizer.id_to_piece(140) == "\u2581" * 4
  ids = tokenizer.encode("if x:\n    return", add_bos=False)
  assert 140 in ids
  assert tokenizer.decode(ids) == "if x:\n    return"


def test_tokenizer_special_ids(gemma3_270m_tokenizer):
  tokenizer = gemma3_270m_tokenizer
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, 2)
  assert tokenizer.vocab_size == 262_144
  assert tokenizer.encode("Hello")[0] == tokenizer.bos_id
  assert len(tokenizer.fingerprint) == 64


# --- the decoder -----------------------------------------------------------


def test_layer_kinds_alternate():
  assert TINY.layer_kinds == ("local", "global", "local", "global")
  assert gemma3.GEMMA3_270M.layer_kinds.count("global") == 3
  assert gemma3.GEMMA3_270M.layer_kinds[5] == "global"


def test_sliding_window_limits_local_attention():
  model = _tiny_model()
  output = model(_tokens(length=8), return_attention_weights=True)
  query, key = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")

  local, global_ = np.asarray(output.attention_weights[0]), np.asarray(
      output.attention_weights[1])
  assert np.all(local[..., (query - key) >= TINY.sliding_window] == 0)
  assert np.all(local[..., (query - key >= 0) & (query - key < 3)] > 0)
  assert np.all(global_[..., key > query] == 0)
  assert np.all(global_[..., key <= query] > 0)


def test_packed_segments_equal_separate_sequences():
  model = _tiny_model(1)
  first, second = _tokens(2, length=5, batch=1), _tokens(3, length=4, batch=1)
  packed = jnp.concatenate([first, second, jnp.zeros((1, 2), jnp.int32)], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 4 + [0] * 2])
  positions = jnp.array([list(range(5)) + list(range(4)) + [0, 0]])

  packed_logits = model(packed, positions, segment_ids).logits
  np.testing.assert_allclose(packed_logits[:, :5], model(first).logits, atol=1e-5)
  np.testing.assert_allclose(packed_logits[:, 5:9], model(second).logits, atol=1e-5)
  assert np.all(np.isfinite(packed_logits))


def test_decoder_returns_hidden_states():
  model = _tiny_model()
  output = model(_tokens(), return_hidden_states=True, return_attention_weights=True)
  assert output.logits.shape == (2, 10, TINY.vocab_size)
  assert len(output.hidden_states) == TINY.num_layers + 1
  assert len(output.attention_weights) == TINY.num_layers
  assert output.attention_weights[0].shape == (2, TINY.num_heads, 10, 10)
  assert np.abs(output.logits).max() <= TINY.final_logit_softcap
  np.testing.assert_allclose(model.logits_from_hidden(output.hidden), output.logits, atol=1e-6)
  assert model(_tokens(), return_logits=False).logits is None


def test_remat_gives_same_gradients():
  tokens = _tokens()
  plain = _tiny_model(2)
  remat = gemma3.Gemma3Decoder(TINY, rngs=nnx.Rngs(0), remat=True)
  nnx.update(remat, nnx.state(plain, nnx.Param))

  def loss(model):
    return jnp.mean(model(tokens).logits ** 2)

  plain_grads = nnx.grad(loss)(plain)
  remat_grads = nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_config_rejects_bad_heads():
  with pytest.raises(ValueError, match="num_heads .3. must be a multiple of num_kv_heads .2."):
    gemma3.Gemma3Config(vocab_size=8, d_model=8, num_layers=1, num_heads=3, num_kv_heads=2,
                        head_dim=4, mlp_dim=8)


# --- writing small files in both layouts ------------------------------------


def _source_tensors(model: gemma3.Gemma3Decoder, layout: str) -> dict[str, np.ndarray]:
  """Return the model's weights under the names and shapes a file of `layout` uses."""
  config = model.config
  names = gemma3_import.tensor_names(config, layout)
  params = {".".join(str(p) for p in path): np.asarray(variable[...])
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  tensors = {}
  for path, name in names.items():
    value = params[path]
    if path.endswith(("q_proj", "k_proj", "v_proj")):
      value = value.reshape(config.d_model, -1).T
    elif path.endswith("o_proj"):
      value = value.reshape(-1, config.d_model).T
    elif path.endswith(("gate_proj", "up_proj", "down_proj")):
      value = value.T
    elif path.endswith("scale") and layout == "gguf":
      value = value + 1.0
    tensors[name] = np.ascontiguousarray(value, np.float32)
  return tensors


def _write_gguf(path, model, *, architecture="gemma3", drop=(), replace=None):
  import gguf  # pylint: disable=g-import-not-at-top

  config = model.config
  writer = gguf.GGUFWriter(str(path), architecture)
  writer.add_context_length(config.max_seq_len)
  writer.add_embedding_length(config.d_model)
  writer.add_block_count(config.num_layers)
  writer.add_feed_forward_length(config.mlp_dim)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_key_length(config.head_dim)
  writer.add_value_length(config.head_dim)
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_rope_freq_base(config.rope_global_base)
  writer.add_sliding_window(config.sliding_window)
  for name, value in _source_tensors(model, "gguf").items():
    if name in drop:
      continue
    if replace and name in replace:
      value = replace[name]
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


def _hf_config(config: gemma3.Gemma3Config) -> dict:
  return {
      "model_type": "gemma3_text", "vocab_size": config.vocab_size,
      "hidden_size": config.d_model, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "intermediate_size": config.mlp_dim,
      "sliding_window": config.sliding_window, "rms_norm_eps": config.rms_norm_eps,
      "query_pre_attn_scalar": config.query_pre_attn_scalar,
      "final_logit_softcapping": config.final_logit_softcap,
      "max_position_embeddings": config.max_seq_len,
      "layer_types": ["full_attention" if kind == "global" else "sliding_attention"
                      for kind in config.layer_kinds],
      "rope_parameters": {
          "full_attention": {"rope_type": "default", "rope_theta": config.rope_global_base},
          "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_base},
      },
  }


def _write_safetensors(directory, model, *, drop=()):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  tensors = {name: value for name, value in _source_tensors(model, "hf").items()
             if name not in drop}
  path = os.path.join(directory, "model.safetensors")
  save_file(tensors, path)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    json.dump(_hf_config(model.config), f)
  return path


def _gguf_config(config):
  """The config a GGUF file can carry: no soft cap, local base from the defaults."""
  return gemma3.Gemma3Config(**{**config.__dict__, "final_logit_softcap": None,
                                "global_every": 6, "rope_local_base": 10_000.0,
                                "query_pre_attn_scalar": float(config.head_dim)})


def test_gguf_round_trip(tmp_path):
  config = _gguf_config(TINY)
  model = _tiny_model(3, config)
  config_read, loaded = gemma3_import.load_gemma3_gguf(_write_gguf(tmp_path / "m.gguf", model))
  assert config_read == config
  tokens = _tokens()
  np.testing.assert_allclose(loaded(tokens).logits, model(tokens).logits, atol=1e-5)


def test_safetensors_round_trip(tmp_path):
  model = _tiny_model(4)
  config_read, loaded = gemma3_import.load_gemma3_safetensors(
      _write_safetensors(str(tmp_path), model))
  assert config_read == TINY
  tokens = _tokens()
  np.testing.assert_allclose(loaded(tokens).logits, model(tokens).logits, atol=1e-6)


def test_gguf_missing_tensor_named(tmp_path):
  model = _tiny_model(0, _gguf_config(TINY))
  path = _write_gguf(tmp_path / "m.gguf", model, drop=("blk.2.ffn_up.weight",))
  with pytest.raises(CheckpointFileError, match=f"{path}: tensor 'blk.2.ffn_up.weight' is "
                     "missing"):
    gemma3_import.load_gemma3_gguf(path)


def test_gguf_other_architecture_rejected(tmp_path):
  path = _write_gguf(tmp_path / "m.gguf", _tiny_model(0, _gguf_config(TINY)),
                     architecture="llama")
  with pytest.raises(CheckpointFileError, match="architecture is 'llama', expected 'gemma3'"):
    gemma3_import.load_gemma3_gguf(path)


def test_gguf_truncated_rejected(tmp_path):
  path = _write_gguf(tmp_path / "m.gguf", _tiny_model(0, _gguf_config(TINY)))
  truncated = str(tmp_path / "truncated.gguf")
  with open(path, "rb") as source, open(truncated, "wb") as target:
    target.write(source.read()[:os.path.getsize(path) - 1000])
  with pytest.raises(CheckpointFileError, match="truncated"):
    gemma3_import.load_gemma3_gguf(truncated)


def test_gguf_garbage_rejected(tmp_path):
  path = tmp_path / "garbage.gguf"
  path.write_bytes(b"not a gguf file at all" * 10)
  with pytest.raises(CheckpointFileError, match="not a readable GGUF file"):
    gemma3_import.load_gemma3_gguf(str(path))


def test_gguf_nan_tensor_rejected(tmp_path):
  model = _tiny_model(0, _gguf_config(TINY))
  bad = np.full((TINY.d_model,), np.nan, np.float32)
  path = _write_gguf(tmp_path / "m.gguf", model, replace={"blk.1.attn_norm.weight": bad})
  with pytest.raises(CheckpointFileError, match="'blk.1.attn_norm.weight' contains NaN"):
    gemma3_import.load_gemma3_gguf(path)


def test_gguf_missing_file_rejected(tmp_path):
  with pytest.raises(CheckpointFileError, match="GGUF file not found"):
    gemma3_import.load_gemma3_gguf(str(tmp_path / "absent.gguf"))


def test_safetensors_missing_tensor_named(tmp_path):
  path = _write_safetensors(str(tmp_path), _tiny_model(),
                            drop=("model.layers.3.self_attn.k_norm.weight",))
  with pytest.raises(CheckpointFileError,
                     match="tensor 'model.layers.3.self_attn.k_norm.weight' is missing"):
    gemma3_import.load_gemma3_safetensors(path)


def test_safetensors_truncated_rejected(tmp_path):
  path = _write_safetensors(str(tmp_path), _tiny_model())
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(CheckpointFileError, match="not a readable safetensors file"):
    gemma3_import.load_gemma3_safetensors(path)


def test_safetensors_other_model_type_rejected(tmp_path):
  path = _write_safetensors(str(tmp_path), _tiny_model())
  with open(os.path.join(str(tmp_path), "config.json"), "w", encoding="utf-8") as f:
    json.dump({**_hf_config(TINY), "model_type": "llama"}, f)
  with pytest.raises(CheckpointFileError, match="model_type is 'llama'"):
    gemma3_import.load_gemma3_safetensors(path)


def test_safetensors_wrong_shape_named(tmp_path):
  path = _write_safetensors(str(tmp_path), _tiny_model())
  other = gemma3.Gemma3Config(**{**TINY.__dict__, "mlp_dim": 64})
  with pytest.raises(CheckpointFileError, match="'model.layers.0.mlp.gate_proj.weight' has "
                     r"shape \(48, 32\), expected \(64, 32\)"):
    gemma3_import.load_gemma3_safetensors(path, other)


def test_loaders_never_unpickle(tmp_path):
  import pickle  # pylint: disable=g-import-not-at-top

  path = tmp_path / "model.safetensors"
  path.write_bytes(pickle.dumps({"model.embed_tokens.weight": np.zeros(3)}))
  shutil.copy(path, tmp_path / "model.gguf")
  with open(tmp_path / "config.json", "w", encoding="utf-8") as f:
    json.dump(_hf_config(TINY), f)
  with pytest.raises(CheckpointFileError):
    gemma3_import.load_gemma3_safetensors(str(path))
  with pytest.raises(CheckpointFileError):
    gemma3_import.load_gemma3_gguf(str(tmp_path / "model.gguf"))


# --- student initialization and vocabulary checks --------------------------


def test_student_copies_every_kth_teacher_layer():
  teacher = _tiny_model(5)
  student_config = gemma3.Gemma3Config(**{**TINY.__dict__, "num_layers": 2})
  student = student_init.init_student_from_teacher(teacher, student_config)
  np.testing.assert_array_equal(student.embedding[...], teacher.embedding[...])
  np.testing.assert_array_equal(student.layers[1].mlp.up_proj[...],
                                teacher.layers[2].mlp.up_proj[...])
  np.testing.assert_array_equal(student.layers[0].attention.q_norm.scale[...],
                                teacher.layers[0].attention.q_norm.scale[...])
  assert student_init.teacher_layers_to_copy(18, 6) == [0, 3, 6, 9, 12, 15]


def test_student_init_rejects_other_width():
  student_config = gemma3.Gemma3Config(**{**TINY.__dict__, "d_model": 16, "num_layers": 2})
  with pytest.raises(ConfigError, match=r"d_model \(teacher 32, student 16\)"):
    student_init.init_student_from_teacher(_tiny_model(), student_config)


def test_vocab_padding_rows_truncated():
  shared = vocabulary.shared_vocab_size(teacher_rows=151_936, student_rows=152_064,
                                        teacher_tokenizer="a" * 64, student_tokenizer="a" * 64,
                                        tokenizer_size=151_665)
  assert shared == 151_936


def test_vocab_different_tokenizers_rejected():
  with pytest.raises(ConfigError, match="teacher and student tokenizers differ"):
    vocabulary.shared_vocab_size(teacher_rows=100, student_rows=100, teacher_tokenizer="a" * 64,
                                 student_tokenizer="b" * 64, tokenizer_size=100)


def test_vocab_too_few_rows_rejected():
  with pytest.raises(ConfigError, match="student embedding has 90 rows but the tokenizer has "
                     "100 pieces"):
    vocabulary.shared_vocab_size(teacher_rows=128, student_rows=90, teacher_tokenizer="a",
                                 student_tokenizer="a", tokenizer_size=100)
