"""Values derived from a validated config: the ModelConfig the layers receive."""

import dataclasses

from tpu_lm.model import kernels
from tpu_lm.model.transformer import ModelConfig

VOCAB_MULTIPLE = 128  # the model's vocabulary is padded to this for even sharding


def tokenizer_vocab_size(config) -> int:
  return 259 if config.data.tokenizer == "bytes" else config.data.vocab_size


def model_config(config, platform: str = "cpu") -> ModelConfig:
  """The `model` section as the frozen ModelConfig layers receive, with derived sizes
  and the attention kernel resolved for `platform` (the mesh's devices)."""
  m = config.model
  derived = {
      "attention": kernels.resolve(m.attention, platform, m.dtype, config.data.seq_len),
      "vocab_size": -(-tokenizer_vocab_size(config) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
      "num_kv_heads": m.num_kv_heads or m.num_heads,
      "head_dim": m.head_dim or m.d_model // m.num_heads,
  }
  copied = {f.name: m[f.name] for f in dataclasses.fields(ModelConfig) if f.name not in derived}
  return ModelConfig(**copied, **derived)
