"""Compression: quantization error bounds and its saved form, pruning masks through
updates and checkpoints, N:M validity, the gradual schedule, distillation at alpha 0,
and the compress command on a trained run."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import tiny_config, train_steps
from tests.test_checkpoint import STREAM
from tests.test_decode import _model
from tpu_lm.data import pipeline
from tpu_lm.errors import UserError
from tpu_lm.inference import run_dir
from tpu_lm.model import quant, transformer
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training import checkpoint, compression, prune
from tpu_lm.training.setup import Setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernels(tree, prefix=""):
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      yield from _kernels(v, path)
    elif k == "kernel":
      yield path, np.asarray(v)


@pytest.mark.parametrize("spec, levels", [(quant.Spec("int8"), 127), (quant.Spec("int4", tile_size=16), 7)],
                         ids=["int8_per_channel", "int4_groups_of_16"])
def test_quantized_kernels_are_within_half_a_step_of_the_floats_and_round_trip_on_disk(spec, levels):
  cfg, params = _model({})
  params = nn.unbox(params)
  qmodel = quant.ptq_model(transformer.Transformer(cfg), spec)
  qparams = quant.quantize(params, qmodel, spec)
  back = quant.dequantize(qparams)
  checked = 0
  for path, w in _kernels(params):
    got = np.asarray(back_at(back, path))
    rows = spec.tile_size or w.shape[0]
    # Absmax per output channel (per group of `rows` input rows): the step is absmax / levels.
    absmax = np.abs(w).reshape(w.shape[0] // rows, rows, w.shape[1]).max(axis=1, keepdims=True)
    bound = np.broadcast_to(absmax / levels / 2, (w.shape[0] // rows, rows, w.shape[1])).reshape(w.shape)
    assert np.all(np.abs(got - w) <= bound * (1 + 1e-5) + 1e-7), path
    assert np.abs(got - w).max() > 0  # it really is quantized
    checked += 1
  assert checked >= 10  # every projection of both layers and the unembedding
  # The saved form (int4 two to a byte) reads back to the very same integers and scales.
  saved = quant.saved_form(qparams)
  if spec.weight_qtype == "int4":
    q = saved["layers_0"]["mlp"]["up"]["kernel"]
    assert q["qvalue"].dtype == np.uint8 and q["qvalue"].size * 2 == np.prod(params["layers_0"]["mlp"]["up"]["kernel"].shape)
  again = quant.from_saved(saved, quant.abstract_quantized(qmodel))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), qparams, again))
  # The quantized model's logits are close to the float model's.
  t = jnp.asarray([[1, 5, 9, 30, 2, 7]])
  ones, pos = jnp.ones_like(t), jnp.arange(6)[None]
  want = transformer.Transformer(cfg).apply({"params": params}, t, ones, pos)[..., :259]
  got = qmodel.apply({"params": qparams}, t, ones, pos)[..., :259]
  assert float(jnp.abs(got - want).max()) < (0.05 if levels == 127 else 0.5) * float(jnp.abs(want).max())


def back_at(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_int4_packing_round_trips_odd_sizes():
  q = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (7, 3)), jnp.int4)
  packed = quant._pack_int4(q)
  assert packed.size == 11
  np.testing.assert_array_equal(np.asarray(quant._unpack_int4(packed, (7, 3)), np.int8), np.asarray(q, np.int8))


def test_n_m_masks_keep_the_n_largest_of_every_m():
  w = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
  mask = np.asarray(prune.nm_mask(jnp.asarray(w), 2, 4))
  groups, kept = np.abs(w).reshape(4, 4, 6), mask.reshape(4, 4, 6)
  assert np.all(kept.sum(axis=1) == 2)
  smallest_kept = np.where(kept, groups, np.inf).min(axis=1)
  largest_dropped = np.where(kept, -np.inf, groups).max(axis=1)
  assert np.all(smallest_kept >= largest_dropped)
  assert prune.valid_nm(w * mask, 2, 4) and not prune.valid_nm(w, 2, 4)
  with pytest.raises(UserError, match="divisible by 4"):
    prune.nm_mask(jnp.ones((6, 2)), 2, 4)


def test_the_gradual_schedule_is_zhu_and_gupta_cubic():
  spec = prune.Spec(sparsity=0.8, begin_step=100, end_step=300, every=10)
  got = [float(prune.sparsity_at(spec, s)) for s in (0, 99, 100, 200, 300, 400)]
  assert got == pytest.approx([0, 0, 0, 0.8 * (1 - 0.5**3), 0.8, 0.8])
  w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 32)), jnp.float32)
  assert float(1 - prune.magnitude_mask(w, 0.25).mean()) == pytest.approx(0.25, abs=1 / 1024)


def test_gradual_pruning_reaches_its_target_exactly_whatever_every_is():
  # end_step - begin_step is not a multiple of every: the last scheduled recomputation
  # (update 200) is short of the target, so the masks are recomputed at end_step too.
  spec = prune.Spec(sparsity=0.9, begin_step=0, end_step=250, every=100)
  params = {"layers_0": {"mlp": {"up": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(20, 10)),
                                                              jnp.float32)}}}}
  tx = prune.masked(optax.sgd(1e-3), spec)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  for _ in range(spec.end_step + 5):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert prune.report(jax.device_get(params), spec)["targets"] == 0.9


def _sparsity(params, targets=prune.Spec().targets):
  return prune.report(jax.device_get(params), prune.Spec(targets=targets))


@pytest.mark.slow  # a sharded training run, a checkpoint and its restore
def test_masks_live_in_the_optimizer_state_and_survive_updates_and_checkpoints(tmp_path):
  config = tiny_config()
  config.prune.update(sparsity=0.5, begin_step=0, end_step=4, every=2)  # gradual: masks at updates 0, 2 and 4
  setup = Setup(config, mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}))
  it = pipeline.train_iter(STREAM, seq_len=32, global_batch=8, seed=0)
  seen = []
  with setup.context():
    state = setup.init(jax.random.key(0))
    for _ in range(4):
      state, _ = setup.train_step(state, setup.device_batch(next(it)))
      seen.append(_sparsity(state.params)["targets"])
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
    ckpt.save(4, state, it, config.to_dict())
    ckpt.wait()
    abstract = checkpoint.abstract_like(setup.abstract_state, setup.state_shardings)
    restored = ckpt.restore(4, abstract, pipeline.train_iter(STREAM, seq_len=32, global_batch=8, seed=0))
    ckpt.close()
    masks = [m for m in jax.tree.leaves(restored.opt_state) if getattr(m, "dtype", None) == jnp.bool_]
    assert masks and any(not bool(m.all()) for m in masks)  # the masks were checkpointed
    zeros_before = jax.tree.map(lambda w: np.asarray(w) == 0, restored.params)
    for _ in range(4):  # through the end of the schedule and past it
      restored, _ = setup.train_step(restored, setup.device_batch(next(it)))
      seen.append(_sparsity(restored.params)["targets"])
  # The schedule's sparsity at each recomputation: 0 at begin_step, 0.5 (1 - 0.5^3), then 0.5.
  assert seen[0] == seen[1] == 0
  assert seen[2] == seen[3] == pytest.approx(0.5 * (1 - 0.5**3), abs=0.01)
  assert seen[4] == seen[5] == seen[6] == seen[7] == pytest.approx(0.5, abs=0.01)  # fixed after end_step
  # Every weight pruned at the checkpoint is still exactly zero after more updates.
  still = jax.tree.map(lambda z, w: bool(np.all(np.asarray(w)[z] == 0)), zeros_before, restored.params)
  assert all(jax.tree.leaves(still))


@pytest.mark.slow  # a compiled training run
def test_two_four_pruning_in_training_gives_valid_masks():
  config = tiny_config()
  config.prune.n_m = "2:4"
  state = train_steps(config, [next(iter(pipeline.train_iter(STREAM, seq_len=32, global_batch=8, seed=0)))] * 3,
                      jax.devices()[:1])[2]
  for path, w in _kernels(state.params):
    if path.startswith("layers_"):
      assert prune.valid_nm(w, 2, 4), path
  assert _sparsity(state.params)["targets"] == pytest.approx(0.5)


@pytest.mark.slow  # several compiled training runs
def test_distillation_at_alpha_0_is_ordinary_training_and_above_0_is_not(trained_run):
  it = pipeline.train_iter(STREAM, seq_len=32, global_batch=8, seed=0)
  batches = [next(it) for _ in range(3)]
  devices = jax.devices()[:2]
  plain = tiny_config()
  plain.mesh.data = 2
  losses, norms, state, _ = train_steps(plain, batches, devices)
  distilled = tiny_config()
  distilled.mesh.data = 2
  distilled.distill.update(teacher=trained_run, alpha=0.0, temperature=2.0)
  d_losses, d_norms, d_state, setup = train_steps(distilled, batches, devices)
  assert setup.task.__class__.__name__ == "Distill"
  np.testing.assert_allclose(d_losses, losses, rtol=1e-6)
  np.testing.assert_allclose(d_norms, norms, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), d_state.params, state.params)
  distilled.distill.alpha = 0.5
  h_losses, *_ = train_steps(distilled, batches, devices)
  assert abs(h_losses[0] - losses[0]) > 1e-3  # the teacher's term is there


def test_a_teacher_with_another_tokenizer_is_one_clear_line(trained_run):
  config = tiny_config()
  config.data.tokenizer = "sentencepiece"
  config.data.vocab_size = 300
  config.distill.teacher = trained_run
  with pytest.raises(UserError, match="teacher and student must share a tokenizer"):
    Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))


@pytest.fixture(scope="module")
def compressed(trained_run, tmp_path_factory):
  out = {}
  for name, q, p in (("int8", quant.Spec("int8"), prune.Spec()),
                     ("int4", quant.Spec("int4", tile_size=16), prune.Spec()),
                     ("pruned_2_4_int8", quant.Spec("int8"), prune.Spec(n_m="2:4"))):
    workdir = str(tmp_path_factory.mktemp(name) / "run")
    out[name] = (workdir, compression.compress(trained_run, workdir, quant_spec=q, prune_spec=p))
  return out


@pytest.mark.slow
def test_compressed_runs_evaluate_close_to_the_source_and_decode(compressed, trained_run):
  n_params = sum(int(np.prod(shape)) for shape in run_dir.saved_param_shapes(
      trained_run, run_dir.resolve_step(trained_run)).values())
  for name, (workdir, result) in compressed.items():
    change = result.compressed["eval_bpb"] - result.source["eval_bpb"]
    assert change < {"int8": 0.01, "int4": 0.1, "pruned_2_4_int8": 1.0}[name], (name, change)
    # The reference size is the float32 parameters (the written checkpoint's size on this
    # 30k-parameter model is mostly Orbax's fixed overhead; bits_per_weight below is the arrays').
    assert result.bytes_on_disk[0] == 4 * n_params and result.bytes_on_disk[1] > 0
    with open(os.path.join(workdir, compression.REPORT_FILE)) as f:
      assert json.load(f)["compressed"]["eval_bpb"] == result.compressed["eval_bpb"]
    run = run_dir.load(workdir, devices=jax.devices()[:1])
    [c] = run.decoder.generate([run.encode_prompt("the model")], run_dir.decode.Sampling(6, 0.0))
    assert len(c.tokens) > 0
  assert compressed["int4"][1].bits_per_weight < compressed["int8"][1].bits_per_weight < 32
  _, two_four = compressed["pruned_2_4_int8"]
  assert two_four.sparsity["targets"] == pytest.approx(0.5)
  assert all(abs(s - 0.5) < 1e-9 for s in two_four.sparsity["per_layer"].values())


@pytest.mark.slow
def test_a_quantized_run_is_served_by_its_integer_kernels(compressed):
  workdir, _ = compressed["int8"]
  run = run_dir.load(workdir, devices=jax.devices()[:1])
  kernel = run.decoder.params["layers_0"]["attn"]["query"]["kernel"]
  assert kernel.array.qvalue.dtype == jnp.int8


@pytest.mark.slow
def test_the_command_refuses_what_it_cannot_do_in_one_line(trained_run, tmp_path):
  env = {**os.environ, "XLA_FLAGS": ""}
  for flags, message in ((["--quant=int3"], "--quant is 'int3': use 'int8', 'int4' or '' (none)."),
                         ([], "nothing to do: give --quant=int8|int4, --sparsity=FRACTION or --n_m=N:M.")):
    proc = subprocess.run([sys.executable, "-m", "tpu_lm.compress", f"--workdir={trained_run}",
                           f"--out={tmp_path}/x", *flags], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(f"{tmp_path}/x")


def test_compressing_into_an_existing_run_is_refused_before_any_work(trained_run, tmp_path, monkeypatch):
  import shutil

  from tpu_lm.training import evaluate

  out = str(tmp_path / "existing")
  shutil.copytree(trained_run, out)
  before = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(out) for f in fs}
  monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated before refusing"))
  with pytest.raises(UserError, match="already holds a run .* pass a new --out directory"):
    compression.compress(trained_run, out, quant_spec=quant.Spec(weight_qtype="int8"), prune_spec=prune.Spec())
  assert {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(out) for f in fs} == before


@pytest.mark.slow  # several compiled training runs
def test_quantization_aware_training_trains_float_weights_that_quantize_to_what_it_simulated():
  config = tiny_config()
  config.quant.update(weight_qtype="int4", tile_size=16, qat=True)
  it = pipeline.train_iter(STREAM, seq_len=32, global_batch=8, seed=0)
  losses, _, state, setup = train_steps(config, [next(it) for _ in range(3)], jax.devices()[:1])
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert state.params["layers_0"]["attn"]["query"]["kernel"].dtype == np.float32  # float master weights
  params = jax.tree.map(jnp.asarray, state.params)  # (Qwix intercepts jax arrays, not numpy ones)
  # The fake-quantized forward pass is the quantized model's, to rounding.
  spec = quant.Spec.from_config(config.quant)
  plain = transformer.Transformer(setup.model_cfg)
  ptq = quant.ptq_model(plain, spec)
  t = jnp.asarray([[1, 5, 9, 30, 2, 7]])
  ones, pos = jnp.ones_like(t), jnp.arange(6)[None]
  simulated = setup.eval_model.apply({"params": params}, t, ones, pos)[..., :259]
  real = ptq.apply({"params": quant.quantize(params, ptq, spec)}, t, ones, pos)[..., :259]
  unquantized = plain.apply({"params": params}, t, ones, pos)[..., :259]
  assert float(jnp.abs(simulated - real).max()) < 0.1 * float(jnp.abs(simulated - unquantized).max())


@pytest.mark.slow
def test_fine_tuning_a_quantized_run_is_refused_in_one_line(compressed):
  from tpu_lm.training import init_from

  workdir, _ = compressed["int8"]
  config = tiny_config()
  config.init_from = workdir
  setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  with pytest.raises(UserError, match="holds int8 kernels .* fine-tune the float run it came from"):
    init_from.check(setup, workdir)
