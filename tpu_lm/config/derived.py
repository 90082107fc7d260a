"""Values derived from a validated config: the ModelConfig the layers receive."""

import dataclasses

from tpu_lm.model import kernels
from tpu_lm.model.transformer import ModelConfig

VOCAB_MULTIPLE = 128  # the model's vocabulary is padded to this for even sharding


def tokenizer_vocab_size(config) -> int:
  """The ids the run's tokenizer makes: its vocabulary and the objective's sentinels
  (past it, but for a Hugging Face tokenizer's)."""
  from tpu_lm import tasks

  own = 259 if config.data.tokenizer == "bytes" else config.data.vocab_size
  if config.data.tokenizer == "hf":  # its sentinels (BERT's [MASK]) are in its vocabulary already
    return own
  return own + len(sentinels(config.data, tasks.from_config(config)))


def sentinels(data, objective) -> tuple[str, ...]:
  """The special tokens past the vocabulary: the objective's (one from outside the
  package may have none), else those a fine-tuned run keeps from its source
  (data.sentinels)."""
  return tuple(getattr(objective, "sentinels", ())) or tuple(data.sentinels)


def rope_scaling(m) -> tuple:
  s = m.rope_scaling
  if s.type == "none":
    return ()
  return (float(s.factor), float(s.low_freq_factor), float(s.high_freq_factor), float(s.original_max_len))


def model_config(config, platform: str = "cpu") -> ModelConfig:
  """The `model` section as the frozen ModelConfig layers receive, with derived sizes
  and the attention kernel resolved for `platform` (the mesh's devices)."""
  from tpu_lm import tasks

  m = config.model
  vocab = tokenizer_vocab_size(config)
  mask = tasks.from_config(config).attention  # the objective's mask kind
  derived = {
      "attention": kernels.resolve(m.attention, platform, m.dtype, config.data.seq_len, mask),
      "attention_mask": mask,
      "vocab_size": -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
      "vocab_used": vocab,
      "rope_scaling": rope_scaling(m),
      "num_classes": 0,  # an objective's (tpu_lm/tasks/), set where it is known
      "vision": vision_config(config),
      "num_kv_heads": m.num_kv_heads or m.num_heads,
      "head_dim": m.head_dim or m.d_model // m.num_heads,
  }
  copied = {f.name: m[f.name] for f in dataclasses.fields(ModelConfig) if f.name not in derived}
  return ModelConfig(**copied, **derived)


def vision_config(config):
  """The `vision` section as model/vision.py's VisionConfig (None: the model reads no images)."""
  v, m = config.get("vision"), config.model
  if v is None or not v.image_height:
    return None
  from tpu_lm.model.vision import VisionConfig

  return VisionConfig(image_height=v.image_height, image_width=v.image_width, out_dim=m.d_model, channels=v.channels,
                      patch=v.patch, patch_height=v.patch_height, num_layers=v.num_layers, d_model=v.d_model, num_heads=v.num_heads,
                      mlp_dim=v.mlp_dim, projector=v.projector, init_std=m.init_std, dtype=m.dtype)


# What makes two models' parameters interchangeable (init_from checks these).
_ARCHITECTURE = ("vocab_used", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "norm",
                 "norm_eps", "position", "rope_theta", "rope_scaling", "mlp", "use_bias", "tie_embeddings",
                 "qk_norm", "logit_softcap", "norm_position")


def architecture_difference(saved: ModelConfig, ours: ModelConfig) -> tuple[str, object, object] | None:
  """(config field, saved value, this config's value) of the first difference, or None."""
  from tpu_lm.model.layers import DEFAULT_EPS

  def value(cfg, name):
    if name == "norm_eps":
      return cfg.norm_eps or DEFAULT_EPS[cfg.norm]
    return getattr(cfg, name)

  names = _ARCHITECTURE + (("max_len",) if ours.position == "learned" else ())
  for name in names:
    if value(saved, name) != value(ours, name):
      field = "data.vocab_size (the tokenizer's vocabulary)" if name == "vocab_used" else f"model.{name}"
      return field, value(saved, name), value(ours, name)
  return None
