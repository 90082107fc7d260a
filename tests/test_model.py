import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from tpu_lm import config as config_lib
from tpu_lm import model as model_lib
from tpu_lm import train

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, num_kv_heads=2, tie_embeddings=False)


def _cfg(**overrides):
  return dataclasses.replace(config_lib.model_config(tiny_config()), **overrides)


def _batch(seed=0, b=2, t=24, vocab=259):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (b, t + 1)).astype(np.int32)
  # Two documents per row: the first 10 tokens, then the rest.
  segment_ids = np.where(np.arange(t) < 10, 1, 2)[None].repeat(b, 0).astype(np.int32)
  positions = np.where(np.arange(t) < 10, np.arange(t), np.arange(t) - 10)[None].repeat(b, 0).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids, "positions": positions}


@pytest.mark.parametrize("family", [{}, LLAMA], ids=["gpt2", "llama"])
def test_packed_documents_do_not_see_each_other(family):
  cfg = _cfg(**family)
  model = model_lib.Transformer(cfg)
  batch = _batch()
  params = model.init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])
  logits = model.apply(params, batch["inputs"], batch["segment_ids"], batch["positions"])
  # Change every token of the first document: the second document's logits must
  # not move, although causal attention alone would let it see the first.
  changed = batch["inputs"].copy()
  changed[:, :10] = (changed[:, :10] + 7) % 250 + 3
  logits2 = model.apply(params, changed, batch["segment_ids"], batch["positions"])
  np.testing.assert_array_equal(logits[:, 10:], logits2[:, 10:])
  assert not np.allclose(logits[:, :10], logits2[:, :10])


def _loss_and_grads(cfg, params, batch):
  model = model_lib.Transformer(cfg)

  def loss(p):
    nats, n = train.token_nats(train.apply_model(model, p, batch), batch)
    return nats / n

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family", [{}, LLAMA], ids=["gpt2", "llama"])
def test_remat_and_scan_give_the_same_loss_and_gradients(family):
  base = _cfg(num_layers=3, **family)
  batch = _batch(1)
  params = model_lib.Transformer(base).init(
      jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"]
  )["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value"))
  ref_loss, ref_grads = _loss_and_grads(base, params, batch)
  stacked = model_lib.stack_layers(params, 3)
  # Each policy once, scanned or not (both layouts are covered by two policies each).
  for remat, scan in (("none", True), ("full", False), ("dots", True), ("qkv_attn", False)):
    cfg = dataclasses.replace(base, remat=remat, scan_layers=scan)
    loss, grads = _loss_and_grads(cfg, stacked if scan else params, batch)
    if scan:
      grads = model_lib.unstack_layers(grads)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=f"remat={remat} scan={scan}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_grouped_query_attention_shapes():
  cfg = _cfg(**LLAMA)
  batch = _batch()
  params = model_lib.Transformer(cfg).init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])
  attn = params["params"]["layers_0"]["attn"]
  assert attn["query_kernel"].value.shape == (32, 4, 8)
  assert attn["key_kernel"].value.shape == (32, 2, 8)
  assert "unembed" in params["params"]


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  batch = _batch()
  f32 = _cfg()
  model = model_lib.Transformer(f32)
  variables = model.init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])
  bf16 = model_lib.Transformer(dataclasses.replace(f32, dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  a = model.apply(variables, batch["inputs"], batch["segment_ids"], batch["positions"])
  b = bf16.apply(variables, batch["inputs"], batch["segment_ids"], batch["positions"])
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(a, b, atol=0.05)


@pytest.mark.parametrize("family", [{}, LLAMA], ids=["gpt2_tied", "llama_untied"])
def test_chunked_logits_give_the_same_loss_and_gradients(family):
  """The loss made 8 positions at a time (never the whole [B, T, V]) equals the whole."""
  cfg = _cfg(**family)
  batch = _batch(2)
  model = model_lib.Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])["params"])

  def loss(p, chunk):
    nats, n = train.batch_nats(model, p, batch, logits_chunk=chunk)
    return nats / n

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
  chunked_loss, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 8)
  np.testing.assert_allclose(chunked_loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
