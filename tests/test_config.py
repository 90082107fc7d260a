import pytest

from configs import base
from tpu_lm.config import checks, derived
from tpu_lm.errors import UserError


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.norm", "batchnorm", "config field model.norm is 'batchnorm': use one of 'layernorm', 'rmsnorm'."),
        ("model.num_kv_heads", 3, "config field model.num_kv_heads is 3: it must divide model.num_heads (4)."),
        ("data.seq_len", 512, "config field data.seq_len is 512: it is longer than the model's positions"),
        ("num_train_steps", 0, "config field num_train_steps is 0: it must be a positive integer."),
        ("optim.schedule", "step", "config field optim.schedule is 'step': use one of"),
        ("mesh.fsdp", 0, "config field mesh.fsdp is 0: it must be a positive integer or -1"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
  c = base.get_config()
  section, _, leaf = field.rpartition(".")
  (c[section] if section else c)[leaf] = value
  with pytest.raises(UserError) as e:
    checks.validate(c)
  assert str(e.value).startswith(message)


def test_odd_head_dim_with_rope_is_rejected():
  c = base.get_config()
  c.model.position, c.model.d_model, c.model.num_heads, c.model.mlp_dim = "rope", 150, 2, 600
  with pytest.raises(UserError, match="even head dimension"):
    checks.validate(c)


def test_base_config_is_valid_and_pads_vocab():
  c = base.get_config()
  checks.validate(c)
  c.data.tokenizer = "bytes"
  assert derived.model_config(c).vocab_size == 384


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_samples_longer_than_the_context_are_refused_before_training(position):
  """RoPE has no position table, but the decoder still stops at max_len: a run that
  would fail only at sampling, after training, fails now."""
  c = base.get_config()
  c.model.position = position
  c.model.max_len = c.data.seq_len = 64
  c.sample.prompt_tokens, c.sample.new_tokens = 32, 48
  with pytest.raises(UserError, match="sample.new_tokens is 48: sample.prompt_tokens .32. plus new tokens must fit"):
    checks.validate(c)
