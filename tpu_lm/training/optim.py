"""The Optax chain: learning-rate schedule, clipping, optimizer, masked weight decay."""

import jax
import optax


def schedule(optim, num_train_steps: int) -> optax.Schedule:
  peak, warmup = optim.learning_rate, optim.warmup_steps
  end = peak * optim.min_lr_ratio
  decay_steps = max(num_train_steps - warmup, 1)
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, warmup + decay_steps, end)
  if optim.schedule == "linear":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.linear_schedule(peak, end, decay_steps)],
        [warmup],
    )
  if optim.schedule == "rsqrt":
    # Linear warmup, then peak * sqrt(warmup / step).
    w = max(warmup, 1)
    return lambda step: peak * jax.numpy.minimum(step / w, jax.lax.rsqrt(jax.numpy.maximum(step, w) / w))
  return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])


DECAYED = ("kernel", "embedding", "pos_embed")


def decay_mask(params):
  """Weight decay (and the L1 penalty) touch weight matrices, never norms or biases.

  By name, not by rank: with scanned layers a bias has a leading layer axis.
  """
  def is_decayed(path, _):
    # The innermost dict key names the parameter; Flax's partitioning boxes add
    # attribute keys after it.
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    return name in DECAYED

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def make(optim, num_train_steps: int, trainable=None) -> optax.GradientTransformation:
  """The whole chain. `trainable(params) -> tree of bools` (training/trainable.py):
  parameters it marks False get no optimizer state and no update."""
  lr = schedule(optim, num_train_steps)
  if optim.optimizer == "adamw":
    opt = optax.adamw(lr, optim.b1, optim.b2, optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)
  elif optim.optimizer == "sgd":
    opt = optax.chain(
        optax.add_decayed_weights(optim.weight_decay, decay_mask),
        optax.sgd(lr, momentum=optim.momentum or None),
    )
  else:
    opt = optax.adafactor(lr, weight_decay_rate=optim.weight_decay or None, weight_decay_mask=decay_mask)
  # The clipping stage is there even when off (an infinite norm passes every
  # update through unchanged, bit for bit): the optimizer state keeps one
  # structure, so a run can resume with clipping turned on or off.
  clip = optim.grad_clip_norm if optim.grad_clip_norm > 0 else float("inf")
  tx = optax.chain(optax.clip_by_global_norm(clip), opt)
  if trainable is None:
    return tx
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))  # noqa: E731
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def update_count(opt_state) -> jax.Array:
  """How many updates the optimizer has applied: the learning-rate schedule's step
  (skipped non-finite steps do not count)."""
  is_count = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
  return next(s.count for s in jax.tree.leaves(opt_state, is_leaf=is_count) if is_count(s))


def l1_penalty(params, strength: float):
  mask = decay_mask(params)
  terms = [abs(p).sum() for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  return strength * sum(terms)
