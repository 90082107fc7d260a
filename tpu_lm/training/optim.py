"""The Optax chain: learning-rate schedule, clipping, optimizer, masked weight decay."""

import jax
import jax.numpy as jnp
import optax

from tpu_lm.model import params as params_lib


def schedule(optim, num_train_steps: int, peak: float | None = None) -> optax.Schedule:
  """The learning rate at each update; `peak` (default optim.learning_rate) is its top
  (Muon's hidden matrices follow the same shape at their own rate)."""
  peak = optim.learning_rate if peak is None else peak
  warmup = optim.warmup_steps
  end = peak * optim.min_lr_ratio
  decay_steps = max(num_train_steps - warmup, 1)
  if optim.schedule == "wsd":
    return wsd(peak, warmup, optim.decay_fraction, num_train_steps, end)
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


def wsd(peak: float, warmup: int, decay_fraction: float, num_train_steps: int, end: float) -> optax.Schedule:
  """Warmup-stable-decay (the trapezoid; Hägele et al. 2024, the speedrun): linear warmup,
  the peak held, then a linear decay to `end` over the last decay_fraction of the steps.

  Until its decay starts a run's rates do not depend on num_train_steps, so a run can be
  resumed into a longer budget (a larger num_train_steps) before its decay and continues
  exactly as if the longer budget had been set from the start (docs/training.md).
  """
  decay_steps = round(decay_fraction * num_train_steps)
  decay_start = max(num_train_steps - decay_steps, warmup)
  w = max(warmup, 1)

  def rate(step):
    step = jnp.asarray(step, jnp.float32)
    up = peak * jnp.minimum(step / w, 1.0) if warmup else jnp.full_like(step, peak)
    down = peak + (end - peak) * jnp.clip((step - decay_start) / max(num_train_steps - decay_start, 1), 0.0, 1.0)
    return jnp.where(step < decay_start, up, jnp.minimum(up, down))

  return rate


DECAYED = ("kernel", "embedding", "pos_embed")


def decay_mask(params):
  """Weight decay (and the L1 penalty) touch weight matrices, never norms or biases.

  By name, not by rank: with scanned layers a bias has a leading layer axis.
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: _name(path) in DECAYED, params)


def _name(path) -> str:
  """A parameter's name: the innermost dict key of its path (Flax's partitioning boxes
  add attribute keys after it)."""
  return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))


def _adamw(optim, lr) -> optax.GradientTransformation:
  return optax.adamw(lr, optim.b1, optim.b2, optim.eps, weight_decay=optim.weight_decay, mask=decay_mask)


def muon_labels(params):
  """"muon" for the blocks' weight matrices (attention and MLP projections), "adamw" for
  the rest: embeddings, an untied unembedding, a classifier head, norms, biases, LoRA
  adapters. Embedding and head are lookups and a readout, not hidden linear maps: the
  speedrun (and Muon's authors) train them with Adam."""
  def label(path, _):
    in_block = any(isinstance(k, jax.tree_util.DictKey) and str(k.key).startswith("layers") for k in path)
    return "muon" if in_block and _name(path) == "kernel" else "adamw"

  return jax.tree_util.tree_map_with_path(label, params)


def _muon_dims(updates):
  # Kernels are [in, out], or [layers, in, out] when scanned: leading axes are batch axes
  # (each layer's matrix orthogonalized on its own).
  from optax.contrib import MuonDimensionNumbers

  return jax.tree.map(lambda x: MuonDimensionNumbers(x.ndim - 2, x.ndim - 1), updates)


def _scale_by_width():
  """Keller Jordan's Muon scale, sqrt(max(1, fan_out / fan_in)): an orthogonal update
  of a wide matrix has the per-entry size of a square one's. (optax's own, scale_by_shape,
  is private to optax.contrib._muon.)"""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * max(1.0, u.shape[-1] / u.shape[-2]) ** 0.5, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def muon(optim, num_train_steps: int) -> optax.GradientTransformation:
  """Muon (Jordan et al. 2024: momentum orthogonalized by Newton-Schulz, optax.contrib's)
  for the blocks' matrices at optim.muon_learning_rate, AdamW for everything else at
  optim.learning_rate, both on the config's schedule and with decoupled weight decay."""
  from optax.contrib import scale_by_muon

  hidden = optax.chain(
      scale_by_muon(beta=optim.muon_momentum, ns_steps=optim.muon_ns_steps, nesterov=True,
                    weight_dimension_numbers=_muon_dims),
      _scale_by_width(),
      optax.add_decayed_weights(optim.weight_decay),
      optax.scale_by_learning_rate(schedule(optim, num_train_steps, peak=optim.muon_learning_rate)),
  )
  rest = _adamw(optim, schedule(optim, num_train_steps))
  return optax.multi_transform({"muon": hidden, "adamw": rest}, muon_labels)


def schedule_free_adamw(optim, num_train_steps: int) -> optax.GradientTransformation:
  """Schedule-free AdamW (Defazio et al. 2024, optax.contrib's): no decay schedule; the
  gradient is taken at y, an interpolation between the Adam iterate z and its running
  average x, and x is the model to evaluate and keep (`eval_params`). optax's own
  schedule_free_adamw decays every parameter; this one spares norms and biases as the
  other optimizers do. optim.b1 is the interpolation, the base Adam has no momentum."""
  from optax.contrib import schedule_free

  lr = schedule(optim, num_train_steps)  # "constant": the warmup, then the peak held
  base = optax.chain(
      optax.scale_by_rms(decay=optim.b2, eps=optim.eps, eps_in_sqrt=False, bias_correction=True),
      optax.add_decayed_weights(optim.weight_decay, decay_mask),
      optax.scale_by_learning_rate(lr),
  )
  return schedule_free(base, learning_rate=lr, b1=optim.b1)


def eval_params(opt_state, params):
  """The parameters to evaluate, sample from, export and serve. For schedule-free AdamW
  that is the average x = (y - (1 - b1) z) / b1 of the trained iterate y (`params`) and
  the optimizer's z; for every other optimizer `params` itself. Frozen parameters (no
  optimizer state) are theirs unchanged."""
  from optax.contrib import ScheduleFreeState

  is_sf = lambda x: isinstance(x, ScheduleFreeState)  # noqa: E731
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_sf) if is_sf(s)]
  if not found:
    return params
  [state] = found
  return average(params, state.z, state.b1)


def average(params, z, b1):
  """Schedule-free's x from y (`params`) and z; where z is an optax.MaskedNode (a frozen
  parameter) the parameter passes through."""
  frozen = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return jax.tree.map(lambda zi, yi: yi if frozen(zi) else params_lib.schedule_free_average(yi, zi, b1),
                      z, params, is_leaf=frozen)


def make(optim, num_train_steps: int, trainable=None) -> optax.GradientTransformation:
  """The whole chain. `trainable(params) -> tree of bools` (training/trainable.py):
  parameters it marks False get no optimizer state and no update."""
  lr = schedule(optim, num_train_steps)
  if optim.optimizer == "adamw":
    opt = _adamw(optim, lr)
  elif optim.optimizer == "muon":
    opt = muon(optim, num_train_steps)
  elif optim.optimizer == "schedule_free_adamw":
    opt = schedule_free_adamw(optim, num_train_steps)
  elif optim.optimizer == "sgd":
    opt = optax.chain(
        optax.add_decayed_weights(optim.weight_decay, decay_mask),
        optax.sgd(lr, momentum=optim.momentum or None),
    )
  elif optim.optimizer == "adafactor":
    opt = optax.adafactor(lr, weight_decay_rate=optim.weight_decay or None, weight_decay_mask=decay_mask)
  else:  # checks.validate names the choices to a user; this is for code that skips it
    raise ValueError(f"unknown optim.optimizer {optim.optimizer!r}")
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
  # The first is the AdamW part's (with Muon: the embeddings', which every run has).
  return next(s.count for s in jax.tree.leaves(opt_state, is_leaf=is_count) if is_count(s))


def l1_penalty(params, strength: float):
  mask = decay_mask(params)
  terms = [abs(p).sum() for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  return strength * sum(terms)
