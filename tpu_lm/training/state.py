"""The train state: everything a step reads and writes, and all a checkpoint holds
besides the data position."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tpu_lm.model import params as params_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  nonfinite_streak: jax.Array  # consecutive steps skipped for a NaN/Inf, up to this one
  # Sums over the current logging window (steps since the last multiple of
  # log_every_steps), of finite steps only. Kept in the state, so the loss logged
  # after a resume mid-window is the same mean an uninterrupted run logs.
  window_loss_sum: jax.Array
  window_nonfinite: jax.Array
  # Dynamic loss scaling (float16 compute; 1 and unused otherwise): the scale and
  # the finite steps since it last changed.
  loss_scale: jax.Array
  scale_good_steps: jax.Array


def init_boxed(rng, *, model, tx, seq_len: int, loss_scale: float = 1.0) -> TrainState:
  """The initial state with parameters still in their logical-partitioning boxes."""
  params = params_lib.init_params(model, rng, seq_len)
  zero = jnp.zeros((), jnp.int32)
  return TrainState(
      zero, params, _fit_boxes(tx.init(params)), zero, jnp.zeros((), jnp.float32), zero,
      jnp.asarray(loss_scale, jnp.float32), zero,
  )


def _fit_boxes(opt_state):
  """Optimizer statistics inherit their parameter's logical axis names (so Adam's
  moments shard like the parameters). Those of another rank (Adafactor's factored
  moments and (1,)-placeholders) lose them: small, they are replicated. So do the
  placeholders optax.multi_transform keeps for frozen parameters (no arrays at all)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

  def fit(x):
    if is_box(x):
      value = x.unbox(apply_constraint=False)
      if getattr(value, "ndim", None) != len(x.names):
        return value
    return x

  return jax.tree.map(fit, opt_state, is_leaf=is_box)
