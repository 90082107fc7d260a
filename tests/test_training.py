"""The train step and loop around the task: optimizers, the non-finite guard's
bookkeeping, resuming with changed settings, MFU and TensorBoard."""

import glob
import os
import struct

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config, train_steps
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training import loop, metrics, optim
from tpu_lm.training.setup import Setup


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  batch = {k: rng.integers(3, 200, (8, 32)).astype(np.int32) for k in ("inputs", "targets")}
  return batch | {"segment_ids": np.ones((8, 32), np.int32), "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))}


_EACH_COMPILES = pytest.mark.slow  # every variant compiles its own sharded train step


@pytest.mark.parametrize("optimizer, schedule", [("adamw", "cosine"), pytest.param("sgd", "linear", marks=_EACH_COMPILES),
                                                 pytest.param("adafactor", "rsqrt", marks=_EACH_COMPILES),
                                                 pytest.param("adafactor", "constant", marks=_EACH_COMPILES),
                                                 pytest.param("schedule_free_adamw", "constant", marks=_EACH_COMPILES)])
def test_every_optimizer_and_schedule_trains_a_sharded_model_of_width_128(optimizer, schedule):
  """Adafactor's factored moments of [128+, 128+] kernels are vectors: their
  shardings must fit them (they crashed with the kernels' 2-D specs)."""
  config = tiny_config()
  config.model.update(d_model=128, mlp_dim=256, num_heads=4)
  config.optim.update(optimizer=optimizer, schedule=schedule, warmup_steps=1,
                      learning_rate={"sgd": 1.0}.get(optimizer, 1e-2))
  config.mesh.update(data=2, fsdp=2, tensor=2)
  losses, norms, state, _ = train_steps(config, [_batch()] * 3, jax.devices())  # one batch, learned
  assert np.all(np.isfinite(losses)) and np.all(norms > 0)
  assert losses[-1] < losses[0]


def test_schedules_warm_up_then_decay_to_their_floor():
  config = tiny_config()
  config.optim.update(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
  for name in ("cosine", "linear", "rsqrt", "constant"):
    config.optim.schedule = name
    lr = optim.schedule(config.optim, 100)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0), name
    end = {"cosine": 0.1, "linear": 0.1, "rsqrt": (10 / 100) ** 0.5, "constant": 1.0}[name]
    assert float(lr(100)) == pytest.approx(end, rel=1e-5), name


@pytest.mark.slow  # two compiled training steps
def test_l1_penalty_adds_its_subgradient_to_weight_matrices_only():
  batch = _batch()
  grads = {}
  for l1 in (0.0, 0.01):
    config = tiny_config()
    config.optim.update(optimizer="sgd", momentum=0.0, weight_decay=0.0, learning_rate=1.0, warmup_steps=0,
                        schedule="constant", grad_clip_norm=0.0, l1_penalty=l1)
    setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    with setup.context():
      state = setup.init(jax.random.key(0))
      params = jax.device_get(state.params)
      new, _ = setup.train_step(state, setup.device_batch(batch))
    # SGD with lr 1: the update is minus the gradient.
    grads[l1] = jax.tree.map(lambda a, b: a - b, params, jax.device_get(new.params))
  diff = jax.tree.map(lambda a, b: a - b, grads[0.01], grads[0.0])
  np.testing.assert_allclose(diff["layers_0"]["mlp"]["up"]["kernel"], 0.01 * np.sign(params["layers_0"]["mlp"]["up"]["kernel"]),
                             atol=1e-6)
  np.testing.assert_allclose(diff["layers_0"]["attn_norm"]["scale"], 0, atol=1e-7)


def test_a_nonfinite_step_leaks_into_neither_the_window_loss_nor_the_learning_rate():
  config = tiny_config()
  config.log_every_steps = 4
  config.optim.update(warmup_steps=10, schedule="linear")
  setup = Setup(config, mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
  batch = _batch()
  with setup.context():
    state = setup.init(jax.random.key(0))
    state, first = setup.train_step(state, setup.device_batch(batch))
    emb = state.params["embed"]["embedding"]
    poisoned = state.replace(params={**state.params, "embed": {"embedding": emb.at[5, 0].set(np.nan)}})
    state, second = setup.train_step(poisoned, setup.device_batch(batch))
    state, third = setup.train_step(state, setup.device_batch(batch))
  assert np.isnan(float(second["step_loss"])) and int(third["nonfinite_steps"]) == 2
  assert float(state.window_loss_sum) == float(first["step_loss"])  # what a mid-window checkpoint holds
  assert float(third["loss"]) == float(first["step_loss"])  # the window's mean over its finite step
  # One update applied: the schedule stands still while steps are skipped.
  assert float(second["lr"]) == float(third["lr"]) == pytest.approx(float(setup.lr(1)))


@pytest.mark.parametrize("kind, peak", [("TPU v5", 459e12), ("TPU v5 lite", 197e12), ("TPU v6 lite", 918e12),
                                        ("TPU v4", 275e12), ("NVIDIA H100 80GB HBM3", 989e12), ("cpu", 0.0)])
def test_peak_flops_by_device_kind(kind, peak):
  """A real v5p reports "TPU v5": it must not match the v5e's row."""
  assert metrics.peak_flops_for_kind(kind) == peak


def _scalar_steps(workdir: str, tag: str) -> list[int]:
  """The steps TensorBoard shows for `tag`: event files in order, and a purge
  (SessionLog START at step s) hides the points at s and after written before it."""
  from tensorboardX.proto import event_pb2

  shown = []
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")), key=os.path.getmtime):
    data = open(path, "rb").read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        shown = [s for s in shown if s < event.step]
      for v in event.summary.value:
        if v.tag == tag:
          shown.append(event.step)
  return shown


@pytest.mark.slow  # two training runs
def test_resume_with_clipping_turned_on_and_tensorboard_without_duplicates(corpus_dir, data_dir, tmp_path):
  """The divergence message says to set optim.grad_clip_norm and rerun: that must
  resume, not be called a damaged checkpoint. And TensorBoard shows each step once."""
  workdir = str(tmp_path / "run")
  config = tiny_config(corpus_dir, data_dir)
  config.update(num_train_steps=6, log_every_steps=1, checkpoint_every_steps=3, eval_every_steps=100)
  config.sample.num_prompts = 0
  config.optim.grad_clip_norm = 0.0
  loop.train_and_evaluate(config, workdir)
  # As if killed after step 6 was logged but before it was saved: a rerun from 3.
  import shutil

  shutil.rmtree(f"{workdir}/checkpoints/6")
  config.optim.grad_clip_norm = 1.0
  config.num_train_steps = 7
  result = loop.train_and_evaluate(config, workdir)
  assert np.isfinite(result["eval_loss"])
  assert _scalar_steps(workdir, "loss") == list(range(1, 8))


@pytest.mark.parametrize("restored", [0, 100])
def test_tensorboard_shows_each_step_once_after_any_restart(tmp_path, restored):
  """A run that died at step 130 (its checkpoint at `restored`, or none) and was started
  again: TensorBoard's own reader sees the restarted run's points and nothing the dead
  attempt logged past the restored step."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  workdir = str(tmp_path)
  dead = metrics.Writer(workdir)
  for step in range(10, 140, 10):
    dead.write(step, {"loss": float(step)})
  dead.close()
  again = metrics.Writer(workdir, resume_step=restored)
  for step in range(restored + 10, restored + 70, 10):
    again.write(step, {"loss": -float(step)})
  again.close()
  events = EventAccumulator(workdir)
  events.Reload()
  points = [(e.step, e.value) for e in events.Scalars("loss")]
  expected = [(s, float(s)) for s in range(10, restored + 1, 10)] + [(s, -float(s)) for s in range(restored + 10, restored + 70, 10)]
  assert points == expected


def test_tokens_per_second_counts_only_the_steps_after_an_eval_inside_the_window():
  """Log every 4 steps, eval after step 2 (taking 100 s), each step 1 s: the rate is
  one step per second, not 4 steps in the 2 s after the eval (the old bookkeeping)."""
  now = [0.0]
  timer = metrics.StepTimer(clock=lambda: now[0])
  for step in range(1, 5):
    now[0] += 1.0
    timer.tick()
    if step == 2:
      now[0] += 100.0  # the eval
      timer.restart()
  assert timer.seconds_per_step() == 1.0
