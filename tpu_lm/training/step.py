"""The jitted train and eval steps: pure functions of (state, batch), generic over
the objective (tpu_lm/tasks/). Gradient accumulation, float16 loss scaling and the
non-finite guard live here, for every task alike."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tpu_lm.training import optim
from tpu_lm.training import trainable as trainable_lib
from tpu_lm.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What the train step needs besides the state and batch, read from the config once."""

  seed: int
  l1: float = 0.0
  log_every: int = 1
  accum_steps: int = 1
  dynamic_scale: bool = False
  scale_period: int = 2000
  dp: object = None  # privacy.gradients.DpOptions: per-example clipped, noised gradients (DP-SGD)


def loss_and_grads(params, batch, rng, *, model, task, opts: StepOptions, loss_scale, trainable=None):
  """Mean loss and its gradient over the global batch, and the task's metrics.

  With accum_steps = k the batch is cut into k microbatches (row i goes to
  microbatch i mod k, so each device keeps its own rows) and a lax.scan sums
  their losses, counts and gradients: one gradient-sized carry, activations of
  one microbatch at a time, and the same result as the whole batch at once. The
  gradient is of the scaled loss (loss_scale > 1 only for float16). Only the
  parameters `trainable` marks True are differentiated: the others get exactly
  zero gradient, and XLA computes none for them.
  """
  split = trainable_lib.Split.of(params, trainable)
  if opts.dp is not None:  # DP-SGD: its own per-example gradient (accumulation inside)
    from tpu_lm.privacy import gradients

    loss, grads, metrics = gradients.loss_and_grads(split, batch, rng, model=model, task=task, dp=opts.dp)
    return loss, _with_l1(split.full_grads(grads), params, opts, trainable, loss_scale), metrics
  if opts.accum_steps == 1:
    def sum_fn(trained):
      total, count, metrics = task.loss(model, split.join(trained), batch, rng)
      # The gradient of the mean: the count does not depend on the parameters.
      return total / jnp.maximum(count, 1) * loss_scale, (total, count, metrics)

    (_, (total, count, metrics)), grads = jax.value_and_grad(sum_fn, has_aux=True)(split.trained)
    count = jnp.maximum(count, 1)
  else:
    k = opts.accum_steps
    micro_batches = jax.tree.map(
        lambda x: nn.with_logical_constraint(
            x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), (None, "act_batch", "act_length")[:x.ndim + 1]
        ),
        batch,
    )

    def sum_fn(trained, micro, rng):
      total, count, metrics = task.loss(model, split.join(trained), micro, rng)
      return total * loss_scale, (total, count, metrics)

    def body(carry, xs):
      grad_sum, total_sum, count_sum, metrics_sum = carry
      i, micro = xs
      (_, (total, count, metrics)), grads = jax.value_and_grad(sum_fn, has_aux=True)(
          split.trained, micro, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, grad_sum, grads), total_sum + total, count_sum + count,
              jax.tree.map(jnp.add, metrics_sum, metrics)), None

    metrics_shape = jax.eval_shape(lambda: task.loss(model, params, jax.tree.map(lambda x: x[0], micro_batches), rng)[2])
    zeros = (jax.tree.map(jnp.zeros_like, split.trained), jnp.zeros(()), jnp.zeros(()),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape))
    (grad_sum, total, count, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro_batches))
    count = jnp.maximum(count, 1)
    grads = jax.tree.map(lambda g: g / count, grad_sum)
  loss = total / count
  # A task's metrics are sums over what its count counts (e.g. correct examples):
  # reported per count, so they mean the same with or without accumulation.
  metrics = jax.tree.map(lambda m: m / count, metrics)
  return loss, _with_l1(split.full_grads(grads), params, opts, trainable, loss_scale), metrics


def _with_l1(grads, params, opts: StepOptions, trainable, loss_scale):
  if not opts.l1:
    return grads
  l1_grads = jax.grad(optim.l1_penalty)(params, opts.l1)
  if trainable is not None:
    l1_grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), l1_grads, trainable)
  return jax.tree.map(lambda g, l: g + l * loss_scale, grads, l1_grads)


def train_step(state: TrainState, batch, frozen=None, *, model, task, tx, lr_schedule, opts: StepOptions,
               trainable=None):
  """One update. `frozen`: parameters the task reads but never trains (a distillation
  teacher's), passed in, not compiled in."""
  if frozen is not None:
    task = task.bind(frozen)
  rng = jax.random.fold_in(jax.random.key(opts.seed), state.step)
  scale = state.loss_scale if opts.dynamic_scale else jnp.ones((), jnp.float32)
  loss, grads, task_metrics = loss_and_grads(
      state.params, batch, rng, model=model, task=task, opts=opts, loss_scale=scale, trainable=trainable)
  if opts.dynamic_scale:
    grads = jax.tree.map(lambda g: g / scale, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.tree.norm(grads)
  # Non-finite guard: a step whose loss, gradients or new parameters hold a NaN or
  # Inf changes nothing but the step counter (the batch is consumed), so no
  # non-finite state can ever exist, let alone be checkpointed or logged. With
  # float16 loss scaling this is also the overflow skip.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
  step = state.step + 1
  loss_sum = state.window_loss_sum + jnp.where(finite, loss, 0.0)
  nonfinite = state.window_nonfinite + 1 - finite.astype(jnp.int32)
  steps_in_window = step - (step - 1) // opts.log_every * opts.log_every
  finite_in_window = steps_in_window - nonfinite
  metrics = {
      # The mean over the window's finite steps (NaN when there were none).
      "loss": jnp.where(finite_in_window > 0, loss_sum / jnp.maximum(finite_in_window, 1), jnp.nan),
      "step_loss": loss, "grad_norm": grad_norm, "nonfinite_steps": nonfinite, "nonfinite_streak": streak,
      "loss_scale": scale,
      # The rate this step's update used: the schedule advances with the updates
      # applied, so skipped steps do not move it.
      "lr": lr_schedule(optim.update_count(state.opt_state)),
      **task_metrics,
  }
  window_ends = step % opts.log_every == 0
  new_scale, good = state.loss_scale, state.scale_good_steps
  if opts.dynamic_scale:
    # Halve on overflow; double after a period of finite steps (and start counting anew).
    grow = finite & (good + 1 >= opts.scale_period)
    new_scale = jnp.where(finite, jnp.where(grow, scale * 2, scale), jnp.maximum(scale / 2, 1.0))
    good = jnp.where(finite & ~grow, good + 1, 0)
  new_state = TrainState(
      step, keep(params, state.params), keep(opt_state, state.opt_state), streak,
      jnp.where(window_ends, 0.0, loss_sum), jnp.where(window_ends, 0, nonfinite), new_scale, good,
  )
  return new_state, metrics


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def eval_step(params, batch, *, model, task):
  return task.eval_sums(model, params, batch)
