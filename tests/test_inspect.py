"""Looking inside: the logit lens, attention maps, attributions and patching."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpu_lm.errors import UserError
from tpu_lm.interpret import probe
from tpu_lm.model import params as params_lib
from tpu_lm.model.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=128, vocab_used=120, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_len=64, norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False,
                  tie_embeddings=False)
TOKENS = [1, 17, 42, 5, 99, 23, 8, 64, 31, 2]


@pytest.fixture(scope="module")
def model_params():
  model = Transformer(CFG)
  boxed = params_lib.init_params(model, jax.random.key(3), 8)
  return model, jax.device_get(nn.unbox(boxed))


def test_last_layer_lens_is_the_models_logits_and_tracing_changes_nothing(model_params):
  model, params = model_params
  tr = probe.trace(model, params, TOKENS)
  t = jnp.asarray(TOKENS)[None]
  plain = model.apply({"params": params}, t, jnp.ones_like(t), jnp.arange(len(TOKENS))[None])[0]
  np.testing.assert_allclose(tr.logits_TxV, plain, atol=1e-4)  # the reference path is the fused kernel's function
  lens = jax.jit(lambda p, x: model.apply({"params": p}, x, method="lens"))(params, tr.residual_PxTxD)
  np.testing.assert_allclose(lens[-1], tr.logits_TxV, atol=1e-5)
  ids, probs = probe.logit_lens(model, params, tr.residual_PxTxD, k=3)
  assert ids.shape == (CFG.num_layers + 1, len(TOKENS), 3)
  np.testing.assert_array_equal(ids[-1, :, 0], np.argmax(tr.logits_TxV, -1))
  assert (ids < CFG.vocab_used).all() and (np.diff(probs, axis=-1) <= 0).all()


def test_attention_rows_sum_to_one_inside_the_causal_same_document_window(model_params):
  model, params = model_params
  seg_1xT = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0, 0, 0]])  # two packed documents and padding
  pos_1xT = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
  _, state = model.apply({"params": params}, jnp.asarray(TOKENS)[None], seg_1xT, pos_1xT, mutable=["intermediates"])
  for i in range(CFG.num_layers):
    a_NxTxT = np.asarray(state["intermediates"][f"layers_{i}"]["attn"]["attn_probs"][0][0])
    np.testing.assert_allclose(a_NxTxT.sum(-1), 1.0, atol=1e-5)
    seg = np.asarray(seg_1xT[0])
    allowed_TxT = np.tril(np.ones((10, 10), bool)) & (seg[:, None] == seg[None, :])
    assert (a_NxTxT[:, ~allowed_TxT] == 0).all()
    assert (a_NxTxT[:, allowed_TxT] > 0).all()


def test_integrated_gradients_are_complete_and_causal(model_params):
  model, params = model_params
  target = 7
  a = probe.attributions(model, params, TOKENS, 5, target, steps=64, baseline_id=0)
  # Completeness: the attributions add up to f(x) - f(baseline).
  assert abs(a["completeness_gap"]) < 0.02 * max(abs(a["logprob"] - a["baseline_logprob"]), 0.1)
  assert a["integrated_gradients"][0] == 0  # the first token is the baseline's too
  assert (a["integrated_gradients"][6:] == 0).all() and (a["grad_x_input"][6:] == 0).all()  # after the position
  # f(x) is the model's own log-probability of the target there.
  lp = jax.nn.log_softmax(probe.trace(model, params, TOKENS).logits_TxV[5])[target]
  assert abs(a["logprob"] - float(lp)) < 1e-4


def test_activation_patching_restores_where_the_texts_differ(model_params):
  model, params = model_params
  corrupt = list(TOKENS)
  corrupt[3] = 77
  p = probe.activation_patching(model, params, TOKENS, corrupt, position=-1)
  restored = p["restored_PxT"]
  assert restored.shape == (CFG.num_layers + 1, len(TOKENS))
  # The embeddings differ only at position 3: patching there restores everything,
  # elsewhere nothing; the last point at the predicting position restores it all.
  np.testing.assert_allclose(restored[0, 3], 1.0, atol=1e-3)
  np.testing.assert_allclose(np.delete(restored[0], 3), 0.0, atol=1e-4)
  np.testing.assert_allclose(restored[-1, -1], 1.0, atol=1e-3)
  np.testing.assert_allclose(restored[:, :3], 0.0, atol=1e-4)  # before the change nothing differs
  with pytest.raises(UserError, match="same length"):
    probe.activation_patching(model, params, TOKENS, TOKENS[:-1])


@pytest.mark.slow
def test_inspect_a_run_directory_writes_pictures_and_a_page(trained_run, tmp_path):
  from tpu_lm.interpret import analysis, run

  m = run.load(trained_run)
  out = str(tmp_path / "inspect")
  r = analysis.inspect_text(m, "the model reads", out=out, corrupt="the model moves", ig_steps=16)
  names = sorted(os.path.basename(f) for f in r["files"])
  assert names == sorted([f"attention_layer{i}.png" for i in range(m.model.cfg.num_layers)]
                         + ["attributions.png", "patching.png", "inspect.html", "inspect.json"])
  page = open(os.path.join(out, "inspect.html")).read()
  assert "<script>" in page and "reads" in page and "http" not in page.split("<script>")[1]  # self-contained
  # Each token's log-probability, by the one scoring function: the audit's log-perplexity
  # of the same text is their sum.
  assert r["token_logprobs"][0] is None and len(r["token_logprobs"]) == len(m.encode("the model reads"))
  from tpu_lm.privacy import audit

  assert audit.log_perplexities(m, ["the model reads"])[0] == pytest.approx(-sum(r["token_logprobs"][1:]), rel=1e-6)
  with pytest.raises(UserError, match="one token"):
    analysis.inspect_text(m, "the model", target="the model reads a token")
  with pytest.raises(UserError, match="outside"):
    analysis.inspect_text(m, "the model", position=40)
