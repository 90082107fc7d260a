"""The speedrun's techniques, each a config choice (docs/training.md "Recipe"): what
each computes, alone, on tiny shapes."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import tiny_config
from tpu_lm.config import derived
from tpu_lm.model import attention, transformer
from tpu_lm.tasks import losses
from tpu_lm.training import optim

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, num_kv_heads=2, tie_embeddings=False)


def _cfg(**overrides):
  return dataclasses.replace(derived.model_config(tiny_config()), **(LLAMA | overrides))


def _init(cfg, seed=0):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(
      transformer.Transformer(cfg).init(jax.random.key(seed), tokens, tokens + 1, jnp.arange(8)[None])["params"])


def _forward(cfg, params, tokens_BxT):
  b, t = tokens_BxT.shape
  return jax.jit(lambda p, x: transformer.Transformer(cfg).apply(
      {"params": p}, x, jnp.ones_like(x), jnp.broadcast_to(jnp.arange(t), (b, t))))(params, tokens_BxT)


def _tokens(b=2, t=12, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 259, (b, t)), jnp.int32)


def _optim(**fields):
  config = tiny_config()
  config.optim.update({"warmup_steps": 0, "schedule": "constant", **fields})
  return config.optim


def test_muon_orthogonalizes_the_blocks_matrices_and_leaves_the_rest_to_adamw():
  rng = np.random.default_rng(0)
  g_wide, g_tall = rng.normal(size=(16, 48)), rng.normal(size=(40, 24))
  g_scanned = rng.normal(size=(3, 16, 24))  # scan_layers: [layers, in, out], each layer on its own
  params = {"embed": {"embedding": jnp.ones((10, 16))}, "unembed": {"kernel": jnp.zeros((16, 10))},
            "layers_0": {"mlp": {"up": {"kernel": jnp.zeros((16, 48))}, "down": {"kernel": jnp.zeros((40, 24))}},
                         "attn_norm": {"scale": jnp.ones(16)}},
            "layers": {"attn": {"query": {"kernel": jnp.zeros((3, 16, 24))}}}}
  grads = {"embed": {"embedding": jnp.asarray(rng.normal(size=(10, 16)))},
           "unembed": {"kernel": jnp.asarray(rng.normal(size=(16, 10)))},
           "layers_0": {"mlp": {"up": {"kernel": jnp.asarray(g_wide)}, "down": {"kernel": jnp.asarray(g_tall)}},
                        "attn_norm": {"scale": jnp.asarray(rng.normal(size=16))}},
           "layers": {"attn": {"query": {"kernel": jnp.asarray(g_scanned)}}}}
  lr, muon_lr = 1e-3, 0.1
  tx = optim.make(_optim(optimizer="muon", learning_rate=lr, muon_learning_rate=muon_lr, weight_decay=0.0,
                         grad_clip_norm=0.0), 10)
  updates, _ = tx.update(grads, tx.init(params), params)

  def orthogonal_part(u, g):
    """The update without its rate and width scale; its singular values, and the exact
    polar factor U V^T of the gradient (Muon's target: the first update's momentum is
    the gradient)."""
    m = -np.asarray(u) / muon_lr / max(1.0, g.shape[-1] / g.shape[-2]) ** 0.5
    u_, _, vt = np.linalg.svd(g, full_matrices=False)
    return m, np.linalg.svd(m, compute_uv=False), u_ @ vt

  for u, g in ((updates["layers_0"]["mlp"]["up"]["kernel"], g_wide),
               (updates["layers_0"]["mlp"]["down"]["kernel"], g_tall),
               *((updates["layers"]["attn"]["query"]["kernel"][i], g_scanned[i]) for i in range(3))):
    m, singular, polar = orthogonal_part(u, g)
    # Five quintic Newton-Schulz steps land every singular value near 1 (Jordan's
    # coefficients trade exactness for speed: within about 0.7..1.2), and the update
    # points along U V^T.
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    assert np.linalg.norm(m - polar) / np.linalg.norm(polar) < 0.25
  # Embedding, unembedding (a 2-D kernel, but a readout, not a hidden map) and norm: AdamW's
  # first step, -lr * g / (|g| + eps): sign-like, at the Adam rate.
  for u, g in ((updates["embed"]["embedding"], grads["embed"]["embedding"]),
               (updates["unembed"]["kernel"], grads["unembed"]["kernel"]),
               (updates["layers_0"]["attn_norm"]["scale"], grads["layers_0"]["attn_norm"]["scale"])):
    np.testing.assert_allclose(u, -lr * np.sign(g), rtol=1e-4)
  assert optim.muon_labels(params)["layers_0"]["attn_norm"]["scale"] == "adamw"


@pytest.mark.slow  # a compiled training step; test_sharding's Muon test is the fast one
def test_muon_trains_with_frozen_parameters_and_counts_its_updates():
  """Frozen parameters (optim.freeze) get no update; the schedule's count is Muon's too."""
  from tests.conftest import train_steps

  config = tiny_config()
  config.optim.update(optimizer="muon", warmup_steps=1, freeze=("layers_0/attn/.*",))
  config.model.update(qk_norm=True)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(3, 200, (8, 32)).astype(np.int32) for k in ("inputs", "targets")}
  batch |= {"segment_ids": np.ones((8, 32), np.int32), "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))}
  config.mesh.update(data=1)
  losses_, _, state, setup = train_steps(config, [batch] * 4, jax.devices()[:1])
  assert losses_[-1] < losses_[0]
  init = setup.init(jax.random.key(0))
  before = jax.device_get(init.params)
  np.testing.assert_array_equal(state.params["layers_0"]["attn"]["query"]["kernel"],
                                before["layers_0"]["attn"]["query"]["kernel"])
  assert not np.array_equal(state.params["layers_0"]["mlp"]["up"]["kernel"], before["layers_0"]["mlp"]["up"]["kernel"])
  assert float(optim.update_count(state.opt_state)) == 4


def test_wsd_holds_the_peak_then_decays_and_a_longer_budget_continues_it():
  o = _optim(schedule="wsd", learning_rate=1.0, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
  lr = optim.schedule(o, 100)
  values = {s: float(lr(s)) for s in (0, 5, 10, 50, 80, 90, 100)}
  assert values == pytest.approx({0: 0.0, 5: 0.5, 10: 1.0, 50: 1.0, 80: 1.0, 90: 0.55, 100: 0.1})
  # Resumed into 200 steps before the decay (step 80) began: every rate so far is the
  # 200-step run's own, so the continuation is the run the larger budget would have been.
  longer = optim.schedule(o, 200)
  steps = np.arange(80)
  np.testing.assert_array_equal(jax.vmap(lr)(steps), jax.vmap(longer)(steps))
  assert float(longer(180)) == pytest.approx(0.55)  # its decay: the last 40 of 200 steps
  # decay_fraction 0: constant after warmup; 1: decay from the end of warmup.
  flat = optim.schedule(_optim(schedule="wsd", learning_rate=1.0, warmup_steps=10, decay_fraction=0.0), 100)
  assert float(flat(100)) == 1.0
  # No warmup: the first update is at the peak, not at zero.
  assert float(optim.schedule(_optim(schedule="wsd", learning_rate=1.0, warmup_steps=0), 100)(0)) == 1.0
  one = optim.schedule(_optim(schedule="wsd", learning_rate=1.0, warmup_steps=10, decay_fraction=1.0,
                              min_lr_ratio=0.0), 100)
  assert [float(one(s)) for s in (10, 55, 100)] == pytest.approx([1.0, 0.5, 0.0])


def test_schedule_free_adamw_is_optaxs_with_norms_undecayed_and_evaluates_at_the_average():
  rng = np.random.default_rng(0)
  params = {"layers_0": {"mlp": {"up": {"kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}},
                         "attn_norm": {"scale": jnp.ones(4)}},
            "embed": {"embedding": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(3)]

  def run(tx, params):
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  o = _optim(optimizer="schedule_free_adamw", learning_rate=0.1, warmup_steps=2, weight_decay=0.0, b1=0.9,
             grad_clip_norm=0.0)
  ours, state = run(optim.make(o, 10), params)
  reference = optax.contrib.schedule_free_adamw(0.1, warmup_steps=2, b1=0.9, b2=o.b2, eps=o.eps)
  theirs, their_state = run(optax.chain(optax.identity(), reference), params)  # ours has a clip stage, here off
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours, theirs)
  averaged = optim.eval_params(state, ours)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), averaged,
               optax.contrib.schedule_free_eval_params(their_state[1], theirs))
  assert not np.allclose(averaged["layers_0"]["mlp"]["up"]["kernel"], ours["layers_0"]["mlp"]["up"]["kernel"])
  assert optim.eval_params(optim.make(_optim(), 10).init(params), params) is params  # other optimizers: y itself
  # Weight decay reaches the kernels, not the norms (optax's own decays every leaf).
  decayed, _ = run(optim.make(_optim(**{**o.to_dict(), "weight_decay": 0.5}), 10), params)
  np.testing.assert_array_equal(decayed["layers_0"]["attn_norm"]["scale"], ours["layers_0"]["attn_norm"]["scale"])
  assert not np.allclose(decayed["layers_0"]["mlp"]["up"]["kernel"], ours["layers_0"]["mlp"]["up"]["kernel"])
  # Frozen parameters keep no z: their value is the model's, unaveraged.
  frozen = lambda p: jax.tree_util.tree_map_with_path(lambda path, _: "embed" not in jax.tree_util.keystr(path), p)
  part, part_state = run(optim.make(o, 10, trainable=frozen), params)
  x = optim.eval_params(part_state, part)
  np.testing.assert_array_equal(x["embed"]["embedding"], params["embed"]["embedding"])
  np.testing.assert_allclose(x["layers_0"]["mlp"]["up"]["kernel"], averaged["layers_0"]["mlp"]["up"]["kernel"], rtol=1e-6)


@pytest.mark.slow  # a training run and its checkpoint
def test_a_schedule_free_run_evaluates_exports_and_serves_its_averaged_parameters(corpus_dir, data_dir, tmp_path):
  import orbax.checkpoint as ocp

  from tests.conftest import corpus_for
  from tpu_lm.inference import run_dir
  from tpu_lm.parallel import mesh as mesh_lib
  from tpu_lm.training import loop
  from tpu_lm.training.evaluate import evaluate
  from tpu_lm.training.setup import Setup

  config = tiny_config(corpus_dir, data_dir)
  config.optim.update(optimizer="schedule_free_adamw", schedule="constant", freeze=("embed/.*",))
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(config, workdir)
  step = run_dir.resolve_step(workdir)
  saved = ocp.PyTreeCheckpointer().restore(f"{workdir}/checkpoints/{step}/state")  # everything, as saved
  found = [d for d in jax.tree.leaves(saved["opt_state"], is_leaf=lambda d: isinstance(d, dict) and "z" in d)
           if isinstance(d, dict) and "z" in d]
  [sf] = found
  y, b1 = saved["params"], float(sf["b1"])
  z = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(sf["z"])}
  assert z and not any(name.startswith("['embed']") for name in z)  # frozen: no z
  x = jax.tree_util.tree_map_with_path(
      lambda p, a: (a - (1 - b1) * z[jax.tree_util.keystr(p)]) / b1 if jax.tree_util.keystr(p) in z else a, y)
  mesh = mesh_lib.make_mesh(mesh_lib.mesh_sizes(config.mesh), jax.devices())
  params, _, _ = run_dir.read_model(workdir, step, run_dir.read_config(workdir, step), mesh, dtype="float32")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, x)
  corpus = corpus_for(config)
  setup = Setup(config, mesh)
  with setup.context():
    at_x, at_y = evaluate(setup, x, corpus), evaluate(setup, y, corpus)
  assert result["eval_loss"] == pytest.approx(at_x["eval_loss"], rel=1e-5)  # the run reported x's loss
  assert at_x["eval_loss"] != pytest.approx(at_y["eval_loss"], rel=1e-5)


def test_schedule_free_needs_a_constant_schedule_and_no_pruning():
  from tpu_lm.config import checks
  from tpu_lm.errors import UserError

  config = tiny_config("/tmp", "/tmp")
  config.optim.update(optimizer="schedule_free_adamw", schedule="cosine")
  with pytest.raises(UserError, match="^config field optim.schedule is 'cosine': schedule-free AdamW replaces the"
                                      " decay by averaging: set optim.schedule='constant'"):
    checks.validate(config)
  config.optim.schedule = "constant"
  config.prune.sparsity = 0.5
  with pytest.raises(UserError, match="^config field optim.optimizer is 'schedule_free_adamw': pruning masks"):
    checks.validate(config)


def test_qk_norm_makes_each_head_unit_rms_times_its_scale_and_logits_blind_to_projection_size():
  x_BxTxNxH = jax.random.normal(jax.random.key(0), (2, 5, 3, 8)) * 7.0
  norm = attention.norm("q", 1e-6, "float32")
  variables = nn.meta.unbox(norm.init(jax.random.key(1), x_BxTxNxH))
  assert variables["params"]["scale"].shape == (8,)  # one [head_dim] scale, shared by the heads
  scale = jnp.linspace(0.5, 2.0, 8)
  y = norm.apply({"params": {"scale": scale}}, x_BxTxNxH)
  np.testing.assert_allclose(y / scale, x_BxTxNxH / jnp.sqrt(jnp.mean(x_BxTxNxH**2, -1, keepdims=True)), rtol=1e-4)
  # In the model: scaling the query and key projections changes nothing downstream.
  cfg = _cfg(qk_norm=True)
  params = _init(cfg)
  assert params["layers_0"]["attn"]["query_norm"]["scale"].shape == (cfg.head_dim,)
  grown = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 10 if any(getattr(k, "key", None) in ("query", "key") for k in path) else x, params)
  tokens = _tokens()
  np.testing.assert_allclose(_forward(cfg, grown, tokens), _forward(cfg, params, tokens), rtol=1e-4, atol=1e-5)
  plain = _cfg()
  assert "query_norm" not in _init(plain)["layers_0"]["attn"]


def test_soft_capped_logits_are_bounded_and_equal_cap_tanh_of_the_uncapped():
  cap = 5.0
  capped, plain = _cfg(logit_softcap=cap), _cfg()
  params = jax.tree.map(lambda x: x * 50 if x.ndim > 1 else x, _init(plain))  # huge logits
  tokens = _tokens()
  raw = _forward(plain, params, tokens)[..., :259]
  got = _forward(capped, params, tokens)[..., :259]
  assert float(jnp.abs(raw).max()) > 3 * cap
  assert float(jnp.abs(got).max()) <= cap
  np.testing.assert_allclose(got, cap * np.tanh(np.asarray(raw) / cap), rtol=1e-5, atol=1e-5)
  # Padding ids stay masked, not capped to -cap.
  assert float(_forward(capped, params, tokens)[..., -1].max()) == pytest.approx(transformer.MASKED_LOGIT)


def test_relu_squared_mlp_computes_down_of_relu_of_up_squared():
  cfg = _cfg(mlp="relu2")
  params = _init(cfg)
  mlp = params["layers_0"]["mlp"]
  assert set(mlp) == {"up", "down"}  # no gate: the speedrun's MLP is not gated
  from tpu_lm.model import layers

  x = jax.random.normal(jax.random.key(0), (2, 3, cfg.d_model))
  got = layers.Mlp(cfg.mlp_dim, "relu2", False, 0.02, 0.02, "float32").apply({"params": mlp}, x)
  want = np.square(np.maximum(np.asarray(x) @ mlp["up"]["kernel"], 0)) @ mlp["down"]["kernel"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_zero_initialised_output_projections_make_every_block_the_identity_at_init():
  cfg = _cfg(zero_init_out=True)
  params = _init(cfg)
  for i in range(cfg.num_layers):
    assert not np.any(params[f"layers_{i}"]["attn"]["out"]["kernel"])
    assert not np.any(params[f"layers_{i}"]["mlp"]["down"]["kernel"])
    assert np.any(params[f"layers_{i}"]["mlp"]["up"]["kernel"])  # the input projections are random as ever
  tokens = _tokens()
  hidden = transformer.Transformer(cfg).apply({"params": params}, tokens, jnp.ones_like(tokens),
                                              jnp.broadcast_to(jnp.arange(12), (2, 12)), method="hidden")
  embedded = params["embed"]["embedding"][tokens]
  normed = embedded / jnp.sqrt(jnp.mean(embedded**2, -1, keepdims=True) + 1e-6) * params["final_norm"]["scale"]
  np.testing.assert_allclose(hidden, normed, rtol=1e-4, atol=1e-5)


def test_z_loss_adds_its_term_to_training_and_never_to_eval():
  from tpu_lm import tasks

  cfg = _cfg()
  params = _init(cfg)
  tokens = _tokens(t=13)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": jnp.ones((2, 12), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(12), (2, 12)), "num_bytes": jnp.ones(2, jnp.int32),
           "num_docs": jnp.ones(2, jnp.int32)}
  model = transformer.Transformer(cfg)
  logits = _forward(cfg, params, batch["inputs"])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).sum()
  lse2 = jnp.square(jax.nn.logsumexp(logits, -1)).sum()
  config = tiny_config()
  config.optim.z_loss = 1e-2
  task = tasks.from_config(config)
  total, count, _ = task.loss(model, params, batch, None)
  assert float(count) == 24
  np.testing.assert_allclose(total, ce + 1e-2 * lse2, rtol=1e-5)
  np.testing.assert_allclose(task.eval_sums(model, params, batch)["nats"], ce, rtol=1e-5)
  # Chunked logits agree.
  np.testing.assert_allclose(losses.token_nats(model, params, batch, None, 4, 1e-2)[0], total, rtol=1e-5)


def test_the_recipe_model_quantizes_and_takes_lora_adapters_on_every_projection():
  """QK-norm's scales are norms (neither Qwix path touches them); ReLU²'s two matrices are
  ordinary projections: int8 keeps the logits close, LoRA adapts each and starts as the model."""
  from tpu_lm.model import lora, quant

  cfg = _cfg(qk_norm=True, mlp="relu2", logit_softcap=10.0, zero_init_out=False)
  params = _init(cfg)
  tokens = _tokens()
  want = _forward(cfg, params, tokens)[..., :259]
  spec = quant.Spec("int8")
  qmodel = quant.ptq_model(transformer.Transformer(cfg), spec)
  got = qmodel.apply({"params": quant.quantize(params, qmodel, spec)}, tokens, jnp.ones_like(tokens),
                     jnp.broadcast_to(jnp.arange(12), (2, 12)))[..., :259]
  assert 0 < float(jnp.abs(got - want).max()) < 0.05 * float(jnp.abs(want).max())
  lmodel = lora.apply(transformer.Transformer(cfg), rank=2, alpha=4.0, targets=".*")
  adapted = nn.meta.unbox(lmodel.init(jax.random.key(0), tokens, jnp.ones_like(tokens),
                                      jnp.broadcast_to(jnp.arange(12), (2, 12)))["params"])
  assert {"layers_0/mlp/up", "layers_0/mlp/down", "layers_0/attn/query"} <= set(lora.adapted_paths(adapted))
  assert "kernel_lora_a" not in adapted["layers_0"]["attn"]["query_norm"]
  np.testing.assert_allclose(lora.merge(adapted, rank=2, alpha=4.0)["layers_0"]["mlp"]["up"]["kernel"],
                             adapted["layers_0"]["mlp"]["up"]["kernel"])  # B starts at zero


def test_z_loss_on_an_objective_without_token_logits_is_refused_in_one_line():
  from tpu_lm.config import checks
  from tpu_lm.errors import UserError

  config = tiny_config("/tmp", "/tmp")
  config.task.kind, config.data.dataset, config.optim.z_loss = "classification", "stdlib_functions", 1e-4
  with pytest.raises(UserError, match="^config field optim.z_loss is 0.0001: the classification objective does not add"
                                      " the z-loss to its loss .* set it to 0\\.$"):
    checks.validate(config)
