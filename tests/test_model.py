import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from tpu_lm.config import derived
from tpu_lm.model import params as params_lib
from tpu_lm.model import transformer
from tpu_lm.tasks import losses

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, num_kv_heads=2, tie_embeddings=False)


def _cfg(**overrides):
  return dataclasses.replace(derived.model_config(tiny_config()), **overrides)


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
  model = transformer.Transformer(cfg)
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
  model = transformer.Transformer(cfg)

  def loss(p):
    nats, n = losses.token_nats(model, p, batch)
    return nats / n

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow  # six compiled gradients a family
@pytest.mark.parametrize("family", [{}, LLAMA], ids=["gpt2", "llama"])
def test_remat_and_scan_give_the_same_loss_and_gradients(family):
  base = _cfg(num_layers=3, **family)
  batch = _batch(1)
  params = transformer.Transformer(base).init(
      jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"]
  )["params"]
  params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params, is_leaf=lambda x: hasattr(x, "value"))
  ref_loss, ref_grads = _loss_and_grads(base, params, batch)
  stacked = params_lib.stack_layers(params, 3)
  # Each policy once, scanned or not (both layouts are covered by two policies each).
  for remat, scan in (("none", True), ("full", False), ("dots", True), ("qkv_attn", False),
                      ("dots_no_batch", True), ("dots_no_batch", False)):
    cfg = dataclasses.replace(base, remat=remat, scan_layers=scan)
    loss, grads = _loss_and_grads(cfg, stacked if scan else params, batch)
    if scan:
      grads = params_lib.unstack_layers(grads)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, err_msg=f"remat={remat} scan={scan}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_grouped_query_attention_shapes():
  cfg = _cfg(**LLAMA)
  batch = _batch()
  params = transformer.Transformer(cfg).init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])
  attn = params["params"]["layers_0"]["attn"]
  assert attn["query"]["kernel"].value.shape == (32, 4 * 8)
  assert attn["key"]["kernel"].value.shape == (32, 2 * 8)
  assert "unembed" in params["params"]


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  batch = _batch()
  f32 = _cfg()
  model = transformer.Transformer(f32)
  variables = model.init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])
  bf16 = transformer.Transformer(dataclasses.replace(f32, dtype="bfloat16"))
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
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])["params"])

  def loss(p, chunk):
    nats, n = losses.token_nats(model, p, batch, logits_chunk=chunk)
    return nats / n

  ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
  chunked_loss, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 8)
  np.testing.assert_allclose(chunked_loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


@pytest.mark.slow  # four compiled variants
def test_dropout_is_the_same_under_remat_and_differs_per_key():
  """Dropout > 0 with scanned layers and with per-layer ones: remat recomputes the
  same masks (the loss and gradients equal those without remat), and another key
  draws other masks."""
  batch = _batch(3)
  for scan in (False, True):
    base = _cfg(num_layers=2, dropout_rate=0.2, scan_layers=scan)
    model = transformer.Transformer(base, deterministic=False)
    params = nn.meta.unbox(model.init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])["params"])

    def loss_fn(cfg, rng):
      m = transformer.Transformer(cfg, deterministic=False)
      return jax.jit(jax.value_and_grad(lambda p: losses.token_nats(m, p, batch, {"dropout": rng})[0]))

    ref_loss, ref_grads = loss_fn(base, jax.random.key(1))(params)
    loss, grads = loss_fn(dataclasses.replace(base, remat="full"), jax.random.key(1))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)
    other, _ = loss_fn(base, jax.random.key(2))(params)
    deterministic = losses.token_nats(transformer.Transformer(base), params, batch)[0]
    assert float(other) != float(ref_loss) and float(deterministic) != float(ref_loss)


def test_head_dim_independent_of_the_width():
  """model.head_dim: 4 heads of 16 in a width-32 model (used by Llama-style configs)."""
  cfg = _cfg(head_dim=16, **LLAMA)
  batch = _batch()
  params = transformer.Transformer(cfg).init(jax.random.key(0), batch["inputs"], batch["segment_ids"], batch["positions"])
  attn = params["params"]["layers_0"]["attn"]
  assert attn["query"]["kernel"].value.shape == (32, 4 * 16)
  assert attn["key"]["kernel"].value.shape == (32, 2 * 16)
  assert attn["out"]["kernel"].value.shape == (4 * 16, 32)
  logits = transformer.Transformer(cfg).apply(params, batch["inputs"], batch["segment_ids"], batch["positions"])
  assert logits.shape == (2, 24, cfg.vocab_size) and np.all(np.isfinite(logits))


@pytest.mark.parametrize("t", [pytest.param(256, marks=pytest.mark.slow), 100])  # 256: several query blocks
def test_xla_attention_equals_softmax_attention_values_and_gradients(t):
  """Query blocks (T=256: 4 of 64) and late normalization change only rounding:
  against jax.nn.dot_product_attention with the same mask, GQA 4/2, packed rows."""
  from tpu_lm.model import kernels

  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, t)), axis=1), jnp.int32)  # documents and padding (0)

  def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=kernels.segment_causal_mask(seg), implementation="xla")

  def ours(q, k, v):
    return kernels.dot_product_attention(q, k, v, seg, "xla")

  np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), atol=2e-6)
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  grads = [jax.grad(lambda *a: (f(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v) for f in (ours, reference)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, atol=2e-5)


def _prefix_of(seg_BxT, lengths=(5, 9, 3)):
  """The first few tokens of each document (segment > 0) as its prefix."""
  seg = np.asarray(seg_BxT)
  prefix = np.zeros(seg.shape, bool)
  for b in range(seg.shape[0]):
    for i, doc in enumerate(sorted(set(seg[b]) - {0})):
      where = np.flatnonzero(seg[b] == doc)
      prefix[b, where[:lengths[i % len(lengths)]]] = True
  return jnp.asarray(prefix)


@pytest.mark.parametrize("mask", ["prefix", "bidirectional"])
def test_every_attention_path_honours_the_mask_kind(mask):
  """The blocked XLA kernel and the reference path (inspect's) against
  jax.nn.dot_product_attention with the explicit mask, values and gradients; packed
  documents, padding, GQA 4/2."""
  from tpu_lm.model import kernels

  rng = np.random.default_rng(1)
  t = 64
  q = jnp.asarray(rng.normal(size=(2, t, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, t)), axis=1), jnp.int32)
  prefix = _prefix_of(seg)
  explicit = kernels.attention_mask(seg, mask, prefix)
  # The kinds differ where they should: a prefix token sees later prefix tokens, a causal one does not.
  assert bool((explicit & ~kernels.attention_mask(seg)).any())

  def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=explicit, implementation="xla")

  def ours(q, k, v):
    return kernels.dot_product_attention(q, k, v, seg, "xla", mask, prefix)

  def inspected(q, k, v):
    return kernels.attention_with_probs(q, k, v, seg, mask, prefix)[0]

  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = reference(q, k, v)
  want_grads = jax.grad(lambda *a: (reference(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
  for f in (ours, inspected):
    np.testing.assert_allclose(f(q, k, v), want, atol=2e-6)
    for a, b in zip(jax.grad(lambda *a: (f(*a) * weights).sum(), argnums=(0, 1, 2))(q, k, v), want_grads):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_the_splash_kernel_runs_a_bidirectional_mask():
  """The TPU kernel (by the Pallas interpreter on CPU) with a full mask: as XLA's."""
  from tpu_lm.model import kernels

  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=(1, 128, 2, 32)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 128, 1, 32)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(np.r_[np.ones(70), 2 * np.ones(58)][None], jnp.int32)
  out = kernels.dot_product_attention(q, k, v, seg, "splash_interpret", "bidirectional")
  np.testing.assert_allclose(out, kernels.dot_product_attention(q, k, v, seg, "xla", "bidirectional"), atol=2e-5)


def test_a_prefix_lm_decodes_what_its_full_forward_pass_computes():
  """Prefill reads the prompt both ways (it is the prefix), each generated token is
  causal: the cached logits equal the full pass with the prompt as the prefix."""
  from tpu_lm.inference import decode

  cfg = dataclasses.replace(derived.model_config(tiny_config()), attention_mask="prefix")
  model = transformer.Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(3).integers(3, 250, (1, 16)), jnp.int32)
  positions = jnp.arange(16)[None]
  params = model.init(jax.random.key(0), tokens, jnp.ones_like(tokens), positions, prefix_BxT=positions < 6)["params"]
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
  full = model.apply({"params": params}, tokens, jnp.ones_like(tokens), positions, prefix_BxT=positions < 6)
  causal = transformer.Transformer(dataclasses.replace(cfg, attention_mask="causal")).apply(
      {"params": params}, tokens, jnp.ones_like(tokens), positions)
  assert not np.allclose(full[0, 3], causal[0, 3], atol=1e-3)  # inside the prefix the kinds differ
  cache, last = decode.prefill(model, params, tokens[:, :6], jnp.array([6]), 32)
  np.testing.assert_allclose(last[0], full[0, 5], rtol=1e-4, atol=1e-4)
  step = jax.jit(lambda tok, pos, cache: model.apply({"params": params}, tok, jnp.ones_like(tok), pos, cache=cache))
  for i in range(6, 16):
    logits, cache = step(tokens[:, i:i + 1], jnp.array([[i]]), cache)
    np.testing.assert_allclose(logits[0, 0], full[0, i], rtol=1e-4, atol=1e-4)
