"""Gradient accumulation, float16 loss scaling, attention kernels and DCN meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config, train_steps
from tpu_lm.config import checks
from tpu_lm.model import kernels
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.parallel import topology
from tpu_lm.training.setup import Setup, check_batch
from tpu_lm.data import pipeline
from tpu_lm.errors import UserError


def _batches(n, batch=8, seq_len=32, seed=0, learnable=False):
  rng = np.random.default_rng(seed)
  if learnable:  # arithmetic sequences: the next token follows from the last two
    docs = [[3 + (a + i * b) % 64 for i in range(rng.integers(20, 80))]
            for a, b in rng.integers(1, 64, (400, 2))]
  else:
    docs = [list(rng.integers(3, 259, rng.integers(5, 80))) for _ in range(80)]
  it = pipeline.train_iter(pipeline.Split.of_tokens(docs), seq_len=seq_len, global_batch=batch, seed=0)
  return [next(it) for _ in range(n)]


def _run(config, batches, devices):
  losses, _, state, _ = train_steps(config, batches, devices)
  return losses, state


def test_accumulation_must_divide_the_per_device_batch():
  config = tiny_config("corpus")
  config.optim.grad_accum_steps = 3
  with pytest.raises(UserError, match="grad_accum_steps is 3: it must divide data.global_batch_size"):
    checks.validate(config)
  config.optim.grad_accum_steps = 2
  config.data.global_batch_size = 8
  mesh = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  with pytest.raises(UserError, match=r"data-parallel devices \(mesh data\*fsdp = 8\) times optim.grad_accum_steps"):
    check_batch(config, mesh, 1)


@pytest.mark.slow
def test_float16_with_loss_scaling_trains_like_float32():
  batches = _batches(16, learnable=True)
  losses = {}
  for dtype in ("float32", "float16"):
    config = tiny_config()
    config.log_every_steps = 1
    config.num_train_steps = len(batches)
    config.optim.learning_rate = 1e-2
    config.model.dtype = dtype
    config.optim.loss_scale_period = 4  # let the scale grow within the test
    losses[dtype], state = _run(config, batches, jax.devices()[:1])
    assert len(losses[dtype]) == len(batches)
    if dtype == "float16":
      assert float(state.loss_scale) > config.optim.loss_scale_init  # grew after finite periods
  assert losses["float32"][-1] < losses["float32"][0] - 1.0  # it did learn
  np.testing.assert_allclose(losses["float16"], losses["float32"], rtol=0.02)


@pytest.mark.slow  # a float16 training run
def test_loss_scale_halves_and_skips_on_overflow_then_grows():
  config = tiny_config()
  config.log_every_steps = 1
  config.model.dtype = "float16"
  config.optim.loss_scale_init = 2.0**24  # float16 gradients overflow at this scale
  config.optim.loss_scale_period = 2
  batches = _batches(12)
  setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  with setup.context():
    state = setup.init(jax.random.key(0))
    first = jax.device_get(state.params)
    scales, skipped = [], []
    for b in batches:
      state, m = setup.train_step(state, setup.device_batch(b))
      scales.append(float(state.loss_scale))
      skipped.append(int(m["nonfinite_streak"]) > 0)
  assert skipped[0] and scales[0] == 2.0**23  # overflow: step skipped, scale halved
  leaf = lambda p: p["embed"]["embedding"]  # noqa: E731
  assert not all(skipped) and not np.array_equal(leaf(jax.device_get(state.params)), leaf(first))
  assert max(np.diff(scales)) > 0  # and it doubles again after finite periods


def _qkv(b=2, t=128, n=4, k=2, h=32, seed=0):
  rng = np.random.default_rng(seed)
  q, kk, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, k, k))
  seg = np.ones((b, t), np.int32)
  seg[0, 50:] = 2  # two documents packed in row 0
  seg[1, 100:] = 0  # padding at the end of row 1
  return q, kk, v, jnp.asarray(seg)


@pytest.mark.slow  # the Pallas kernel in its interpreter, forward and backward
def test_splash_kernel_matches_xla_forward_and_backward():
  """The TPU Pallas kernel, run by the Pallas interpreter on CPU."""
  q, k, v, seg = _qkv()

  def loss(impl):
    return lambda q, k, v: (kernels.dot_product_attention(q, k, v, seg, impl) ** 2).sum()

  out = kernels.dot_product_attention(q, k, v, seg, "splash_interpret")
  ref = kernels.dot_product_attention(q, k, v, seg, "xla")
  np.testing.assert_allclose(out, ref, atol=2e-5)
  grads = jax.grad(loss("splash_interpret"), argnums=(0, 1, 2))(q, k, v)
  ref_grads = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=5e-5)


def test_splash_kernel_under_a_mesh_runs_per_shard():
  """Rows over data, heads over tensor: the kernel runs inside shard_map."""
  q, k, v, seg = _qkv(b=4)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = mesh_lib.rules_tuple(tiny_config().mesh.rules)
  import flax.linen as nn

  with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(lambda *a: kernels.dot_product_attention(*a, "splash_interpret"))(q, k, v, seg)
  np.testing.assert_allclose(out, kernels.dot_product_attention(q, k, v, seg, "xla"), atol=2e-5)


def test_auto_attention_picks_the_kernel_for_the_platform():
  assert kernels.resolve("auto", "gpu", "bfloat16") == "cudnn"
  assert kernels.resolve("auto", "gpu", "float32") == "xla"  # cuDNN takes 16-bit inputs only
  assert kernels.resolve("auto", "tpu") == "splash"
  assert kernels.resolve("auto", "cpu") == "xla"
  assert kernels.resolve("xla", "tpu") == "xla"


def test_dcn_mesh_keeps_slices_together():
  """Two v5p-8 slices (libtpu's description): the data axis crosses slices only in
  its outer half; fsdp stays inside a slice."""
  devices = topology.devices(topology.parse("v5p-8", num_slices=2))
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 2, "dcn_fsdp": 1, "dcn_tensor": 1}, devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].ravel()} == {i}
  with pytest.raises(UserError, match="has 4 slices but 2 are available"):
    mesh_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 4}, devices)


def test_slice_names_and_shapes():
  assert topology.parse("v5p-64").shape == (2, 4, 4)
  assert topology.parse("v5p-512").num_hosts == 64
  assert topology.parse("v5e-16").shape == (4, 4)
  assert topology.parse("v6e-8").num_hosts == 1
  assert topology.parse("v4-8", num_slices=2).num_chips == 8
  for bad in ("v5p-12", "v7-8", "v5e-2", "h100"):
    with pytest.raises(UserError, match="--compile_for"):
      topology.parse(bad)
