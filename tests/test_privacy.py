"""DP-SGD: clipping, the private step against the ordinary one, the accountant
against dp_accounting, the Poisson loader, and a private run end to end."""

import dataclasses
import functools
import json
import os
import shutil

import dp_accounting
import jax
import numpy as np
import pytest

from tests.conftest import corpus_for, tiny_config
from tpu_lm.errors import UserError
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.privacy import accounting
from tpu_lm.privacy import gradients
from tpu_lm.privacy import run as private_run
from tpu_lm.privacy import sampling
from tpu_lm.training import step
from tpu_lm.training.setup import Setup

B, T = 8, 32


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, 250, (B, T + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)), gradients.PADDING: np.zeros(B, bool)}


@pytest.fixture(scope="module")
def setup_and_params():
  c = tiny_config()
  c.data.seq_len, c.data.global_batch_size = T, B
  setup = Setup(c, mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))  # 8 fake devices, data parallel
  with setup.context():
    params = setup.init(jax.random.key(0)).params
  return setup, params


@functools.lru_cache(maxsize=None)
def _grad_fn(setup, dp):
  """One compiled gradient per (setup, DP options): the batches below share shapes."""
  opts = dataclasses.replace(setup.step_options, dp=dp)
  return jax.jit(lambda p, b: step.loss_and_grads(p, b, jax.random.key(1), model=setup.train_model, task=setup.task,
                                                  opts=opts, loss_scale=1.0)[:2])


def _grads(setup, params, batch, dp=None):
  with setup.context():
    loss, grads = _grad_fn(setup, dp)(
        params, setup.device_batch({k: v for k, v in batch.items() if dp or k != gradients.PADDING}))
  return float(loss), jax.device_get(grads)


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


def _dp(clip, noise=0.0, expected=B):
  return gradients.DpOptions(clip, noise, expected, batch_axes=("data",))


def test_without_noise_and_clipping_the_private_step_is_ordinary_training(setup_and_params):
  setup, params = setup_and_params
  batch = _batch()
  loss, grads = _grads(setup, params, batch)
  dp_loss, dp_grads = _grads(setup, params, batch, _dp(clip=1e6))
  assert abs(loss - dp_loss) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7), grads, dp_grads)


@pytest.mark.slow
def test_gradient_accumulation_inside_the_clipping_changes_nothing(setup_and_params):
  setup, params = setup_and_params
  _, whole = _grads(setup, params, _batch(3), _dp(clip=1e-3))
  _, micro = _grads(setup, params, _batch(3), gradients.DpOptions(1e-3, 0.0, B, microbatch=2, batch_axes=("data",)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), whole, micro)


def test_clipping_bounds_every_examples_contribution(setup_and_params):
  setup, params = setup_and_params
  clip = 1e-3  # far below every example's gradient norm
  batch = _batch(1)
  _, full = _grads(setup, params, batch, _dp(clip))
  assert _norm(full) <= clip + 1e-9  # B examples of norm <= clip, divided by B
  for i in (0, 5):
    without = dict(batch)
    without[gradients.PADDING] = np.arange(B) == i
    _, rest = _grads(setup, params, without, _dp(clip))
    contribution = _norm(jax.tree.map(lambda a, b: a - b, full, rest))
    # Each example moves the update by exactly its clipped gradient / B: norm clip / B.
    np.testing.assert_allclose(contribution, clip / B, rtol=1e-3)


@pytest.mark.slow
def test_noise_has_the_calibrated_scale(setup_and_params):
  setup, params = setup_and_params
  clip, noise = 1e-3, 2.0  # the clipping test's compiled step serves the quiet run
  _, quiet = _grads(setup, params, _batch(2), _dp(clip))
  _, noisy = _grads(setup, params, _batch(2), _dp(clip, noise))
  diff = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(quiet))])
  np.testing.assert_allclose(diff.std(), noise * clip / B, rtol=0.05)
  assert abs(diff.mean()) < 0.05 * noise * clip / B


def _segment(noise, start=0, n=5000, expected=24, rows=32, plan=()):
  return accounting.Segment(start, noise, n, expected, rows, plan)


def _their_epsilon(parts, delta, grid=1e-4):
  """dp_accounting's own PLD composition of (segment, steps) pairs (its default grid:
  finer than ours; ours, 1e-3: the same computation, for an exact comparison)."""
  acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=grid)
  for seg, steps in parts:
    acc.compose(dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=seg.num_examples, sampling_probability=seg.expected_batch / seg.num_examples,
        truncated_batch_size=seg.batch_rows, noise_multiplier=seg.noise_multiplier), steps)
  return acc.get_epsilon(delta)


def test_epsilon_matches_dp_accounting_computed_independently():
  n, rows, delta, sigma, steps = 5000, 32, 1e-5, 1.1, 300
  ours = accounting.epsilon([_segment(sigma)], steps, delta)
  theirs = _their_epsilon([(_segment(sigma), steps)], delta)
  assert theirs <= ours <= theirs * 1.002  # our coarser grid is pessimistic, never optimistic
  # The default expected batch leaves truncation too rare to cost epsilon: the same as
  # untruncated Poisson sampling (which the RDP accountant bounds more loosely).
  e = sampling.expected_batch_size(0, rows, n)
  assert sampling.truncation_probability(e, n, rows) <= 1e-6 < sampling.truncation_probability(e + 1, n, rows)
  poisson = dp_accounting.pld.PLDAccountant()
  poisson.compose(dp_accounting.PoissonSampledDpEvent(e / n, dp_accounting.GaussianDpEvent(sigma)), steps)
  truncated = accounting.epsilon([_segment(sigma, expected=e)], steps, delta)
  assert poisson.get_epsilon(delta) <= truncated <= 1.01 * poisson.get_epsilon(delta)  # (our grid: +0.7% here)
  rdp = dp_accounting.rdp.RdpAccountant()
  rdp.compose(dp_accounting.PoissonSampledDpEvent(e / n, dp_accounting.GaussianDpEvent(sigma)), steps)
  assert rdp.get_epsilon(delta) > poisson.get_epsilon(delta)
  # Calibration: the noise reaches the target epsilon (from below, within 2%).
  [calibrated] = accounting.extend([], _segment(0.0), 0, steps, 2.0, delta)
  assert 0.98 * 2.0 <= accounting.epsilon([calibrated], steps, delta) <= 2.0
  assert accounting.epsilon([_segment(0.0)], steps, delta) == float("inf")
  assert accounting.epsilon([_segment(sigma)], 0, delta) == 0.0


def test_a_resumed_run_charges_each_step_at_the_noise_it_was_taken_with():
  """The review's case: 20 steps calibrated to a target epsilon, then resumed to train to 60."""
  delta, target = 1e-5, 0.5  # a low target: much noise, a quicker accountant
  plan20, plan60 = (target, 0.0, 20), (target, 0.0, 60)
  first = accounting.extend([], _segment(0.0, plan=plan20), 0, 20, target, delta)
  assert 0.98 * target <= accounting.epsilon(first, 20, delta) <= target
  # Resumed with the same plan: the same segment goes on, with the same noise.
  assert accounting.extend(first, _segment(0.0, start=10, plan=plan20), 10, 20, target, delta) == first
  # All 20 steps spent: training on to 60 would exceed the target; said before training.
  with pytest.raises(UserError, match=r"spent epsilon \d\.\d+ of privacy.target_epsilon=0.5: training on to 60"):
    accounting.extend(first, _segment(0.0, start=20, plan=plan60), 20, 60, target, delta)
  # Resumed from step 10 to train to 60: the last 50 steps get more noise, and the whole run
  # (10 steps at the first noise, 50 at the new one) stays within the target.
  resumed = accounting.extend(first, _segment(0.0, start=10, plan=plan60), 10, 60, target, delta)
  assert [s.start for s in resumed] == [0, 10] and resumed[1].noise_multiplier > first[0].noise_multiplier
  whole = accounting.epsilon(resumed, 60, delta)
  assert whole == pytest.approx(_their_epsilon([(first[0], 10), (resumed[1], 50)], delta, grid=1e-3), rel=1e-9)
  assert 0.98 * target <= whole <= target
  # Epsilon never falls: at the resumed step it is what the first run had logged there.
  eps = [accounting.epsilon(resumed, s, delta) for s in (10, 11, 35, 60)]
  assert eps[0] == accounting.epsilon(first, 10, delta) and eps == sorted(eps)
  # A larger batch on resume is a new segment, accounted at its own rate.
  bigger = accounting.extend(first, _segment(0.7, start=10, expected=28, plan=(0.0, 0.7, 20)), 10, 20, 0.0, delta)
  assert accounting.epsilon(bigger, 20, delta) == pytest.approx(
      _their_epsilon([(first[0], 10), (bigger[1], 10)], delta, grid=1e-3), rel=1e-9)


def test_resuming_on_another_dataset_is_refused():
  saved = {"poisson_steps_drawn": 10, private_run.LEDGER: [dataclasses.asdict(_segment(0.8, n=5000))]}
  assert private_run._ledger(saved, 5000) == [_segment(0.8, n=5000)]
  with pytest.raises(UserError, match="now has 4000 examples and the checkpoint's privacy accounting is for 5000"):
    private_run._ledger(saved, 4000)
  with pytest.raises(UserError, match="without privacy.dp"):
    private_run._ledger({"streams": []}, 5000)


def test_the_poisson_loader_samples_at_its_rate_and_resumes_its_draws():
  examples = {"inputs": np.arange(400 * 4).reshape(400, 4)}
  make = lambda: sampling.PoissonLoader(examples, sampling_prob=10 / 400, num_steps=200, batch_rows=16, seed=3)  # noqa: E731
  loader = make()
  batches = [next(loader) for _ in range(200)]
  sizes = np.array([(~b[gradients.PADDING]).sum() for b in batches])
  assert abs(sizes.mean() - 10) < 0.6 and sizes.max() <= 16
  for b in batches[:5]:  # padding rows are zeros, real rows are examples
    real = ~b[gradients.PADDING]
    assert (b["inputs"][~real] == 0).all() and (b["inputs"][real][:, 0] % 4 == 0).all()
  resumed = make()
  resumed.restore_position({"poisson_steps_drawn": 120})
  np.testing.assert_array_equal(next(resumed)["inputs"], batches[120]["inputs"])
  with pytest.raises(UserError, match="without privacy.dp"):
    resumed.restore_position({"streams": []})


@pytest.mark.slow
def test_a_private_run_logs_epsilon_and_resumes_exactly(corpus_dir, data_dir, tmp_path):
  from tpu_lm.training import loop
  from tpu_lm.training import checkpoint as checkpoint_lib

  c = tiny_config(corpus_dir, data_dir)
  with c.unlocked():
    c.privacy.dp, c.privacy.target_epsilon, c.privacy.delta = True, 1.0, 1e-3  # a target this low: much noise, a quick accountant
    c.data.global_batch_size, c.sample.num_prompts, c.keep_checkpoints = 16, 0, 3
  run = str(tmp_path / "dp")
  loop.train_and_evaluate(c, run)
  records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
  eps = [r["epsilon"] for r in records if "epsilon" in r]
  assert len(eps) == 3 and eps == sorted(eps) and 0.8 < eps[-1] <= 1.0  # the target, reached at the last step
  # Resume from the step-3 checkpoint: the same Poisson draws and noise, the same final parameters.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(run, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
  loop.train_and_evaluate(c, resumed)
  states = []
  for d in (run, resumed):
    ckpt = checkpoint_lib.Checkpointer(os.path.join(d, "checkpoints"), 3)
    states.append(jax.device_get(ckpt._mngr.restore(6).state["params"]))
    ckpt.close()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), *states)
  # Trained to its target: training on under the same target is refused before any step.
  with c.unlocked():
    c.num_train_steps = 9
  with pytest.raises(UserError, match="training on to 9 steps would exceed it"):
    loop.train_and_evaluate(c, resumed)
  # From the step-3 checkpoint to 9 steps: the 6 steps left take more noise, and the
  # epsilon the loop logs is the composition of 3 steps at the first noise and 6 at the new one.
  ckpt = checkpoint_lib.Checkpointer(os.path.join(run, "checkpoints"), 3)
  saved = ckpt.saved_item(3, "data")
  ckpt.close()
  setup = Setup(c, mesh_lib.make_mesh(mesh_lib.mesh_sizes(c.mesh)))
  private = private_run.prepare(setup, corpus_for(c), lambda _: None, resumed=(3, saved))
  first, rest = private.segments
  assert (first.start, rest.start) == (0, 3) and rest.noise_multiplier > first.noise_multiplier
  assert setup.step_options.dp.noise_multiplier == rest.noise_multiplier  # the step runs with it
  theirs = _their_epsilon([(first, 3), (rest, 6)], 1e-3)
  assert theirs <= private.metrics(9)["epsilon"] <= theirs * 1.002 and private.metrics(9)["epsilon"] <= 1.0
  assert private.metrics(2)["epsilon"] == eps[0]  # the steps before the resume are charged as they were
  # The same run resumed without privacy.dp: one sentence, nothing changed on disk.
  with c.unlocked():
    c.privacy.dp = False
  with pytest.raises(UserError, match="privacy.dp=True"):
    loop.train_and_evaluate(c, resumed)
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["3", "6"]


def test_private_config_mistakes_are_one_sentence(corpus_dir, data_dir, tmp_path):
  from tpu_lm.config import checks
  from tpu_lm.training import loop

  c = tiny_config(corpus_dir, data_dir)
  with c.unlocked():
    c.privacy.dp, c.privacy.noise_multiplier, c.privacy.target_epsilon = True, 1.0, 3.0
  with pytest.raises(UserError, match="not both"):
    checks.validate(c)
  with c.unlocked():
    c.privacy.target_epsilon, c.privacy.delta, c.privacy.expected_batch_size = 0.0, 0.5, 2
  with pytest.raises(UserError, match="not below 1 / N"):
    loop.train_and_evaluate(c, str(tmp_path / "bad"))
