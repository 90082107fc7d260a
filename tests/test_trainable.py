"""Frozen parameters (optim.freeze, LoRA's base model) are outside the gradient: XLA
computes none for them, the logged gradient norm is the trained leaves', and DP-SGD
clips each example's gradient of the trained leaves alone."""

import dataclasses

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.privacy import gradients
from tpu_lm.training import step, trainable
from tpu_lm.training.setup import Setup

B, T = 4, 16
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def _batch(seed=0, padding=()):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 250, (B, T + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
          gradients.PADDING: np.isin(np.arange(B), padding)}


def _setup(**changes):
  c = tiny_config()
  c.data.seq_len, c.data.global_batch_size = T, B
  for dotted, value in changes.items():
    section, leaf = dotted.split(".")
    c[section][leaf] = value
  return Setup(c, mesh_lib.make_mesh(ONE_DEVICE, jax.devices()[:1]))


@pytest.fixture(scope="module")
def plain():
  setup = _setup()
  with setup.context():
    return setup, setup.init(jax.random.key(0)).params


def _grads_fn(setup, dp=None):
  opts = dataclasses.replace(setup.step_options, dp=dp)
  return lambda p, b: step.loss_and_grads(p, b, jax.random.key(1), model=setup.train_model, task=setup.task,
                                          opts=opts, loss_scale=1.0, trainable=setup.trainable)[1]


def _dot_generals(fn, *args) -> int:
  """Matmuls in the traced computation, nested calls included (the printed jaxpr inlines them)."""
  return str(jax.make_jaxpr(fn)(*args)).count("dot_general")


def test_no_gradient_is_computed_for_a_frozen_block(plain):
  setup, params = plain
  batch = {k: v for k, v in _batch().items() if k != gradients.PADDING}
  frozen = _setup(**{"optim.freeze": ("layers_0/.*",)})
  kernels = [n for n in trainable.frozen_names(params, frozen.trainable) if n.endswith("kernel")]
  assert len(kernels) >= 4
  with setup.context():
    everything = _dot_generals(_grads_fn(setup), params, batch)
    without = _dot_generals(_grads_fn(frozen), params, batch)
  # Each frozen kernel's weight gradient was one matmul of the backward pass.
  assert without <= everything - len(kernels)


def test_grad_norm_covers_the_trained_parameters_only(plain):
  _, params = plain
  batch = {k: v for k, v in _batch(1).items() if k != gradients.PADDING}
  frozen = _setup(**{"optim.freeze": ("layers_0/.*", "embed/.*")})
  with frozen.context():
    state = frozen.init(jax.random.key(0)).replace(params=params)
    _, metrics = jax.jit(frozen.train_step._fn)(state, frozen.device_batch(batch), None)
    grads = jax.jit(_grads_fn(frozen))(params, batch)
  flags = jax.tree.leaves(frozen.trainable)
  assert not any(np.any(np.asarray(g)) for g, t in zip(jax.tree.leaves(grads), flags) if not t)
  trained = [np.asarray(g) for g, t in zip(jax.tree.leaves(grads), flags) if t]
  assert all(np.any(g) for g in trained[-2:])  # the blocks after the frozen one do learn
  expected = float(np.sqrt(sum(np.sum(np.square(g)) for g in trained)))
  np.testing.assert_allclose(float(metrics["grad_norm"]), expected, rtol=1e-5)


def test_dp_with_lora_clips_the_adapters_gradient_alone():
  setup = _setup(**{"lora.rank": 2})
  clip = 1e-4  # far below any example's gradient norm: every example is clipped to exactly this
  dp = gradients.DpOptions(clip, 0.0, 1.0)
  with setup.context():
    params = setup.init(jax.random.key(0)).params
    # One real example and an expected batch of 1: the update is that example's clipped gradient.
    grads = jax.jit(_grads_fn(setup, dp))(params, setup.device_batch(_batch(2, padding=(1, 2, 3))))
  flags = jax.tree.leaves(setup.trainable)
  trained = [np.asarray(g) for g, t in zip(jax.tree.leaves(grads), flags) if t]
  norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in trained)))
  np.testing.assert_allclose(norm, clip, rtol=1e-3)
  assert not any(np.any(np.asarray(g)) for g, t in zip(jax.tree.leaves(grads), flags) if not t)
