"""DP-SGD's gradient (Abadi et al. 2016) through jax-privacy: every example's gradient
(of its own mean token loss) clipped to L2 norm clip_norm (jax_privacy.clipping
.clipped_grad, vmapped over the batch and split over the data-parallel devices),
the clipped gradients summed, Gaussian noise of standard deviation noise_multiplier
x clip_norm added to the sum, and the result divided by the expected batch size.
Only the trained parameters are differentiated (and noised).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

PADDING = "dp_padding"  # batch field: True for the rows that only fill the compiled batch


@dataclasses.dataclass(frozen=True)
class DpOptions:
  clip_norm: float
  noise_multiplier: float
  expected_batch: float  # q x N: the clipped, noised sum is divided by this
  microbatch: int | None = None  # rows per vmapped chunk (gradient accumulation)
  batch_axes: tuple = ()  # mesh axes the batch is split over (the vmapped axis's sharding)


def loss_and_grads(split, batch, rng, *, model, task, dp: DpOptions):
  """(mean loss over the real examples, privatized gradient of the trained leaves
  `split.trained` (a list), metrics). An example's clipped norm is its gradient's
  over the trained leaves alone: frozen ones (a LoRA base model, optim.freeze) are
  constants here, neither differentiated nor noised."""
  padding_B = batch[PADDING]
  examples = {k: v for k, v in batch.items() if k != PADDING}
  # Inside the per-example function a batch has one row: its logical "act_batch"
  # axis must not be sharded (the vmapped axis is, over batch_axes).
  rules = tuple((name, None if name == "act_batch" else axes) for name, axes in nn.get_logical_axis_rules())

  def example_loss(trained, example_1xT, rng):  # clipped_grad keeps each example's batch axis (of 1)
    with nn.logical_axis_rules(rules):
      total, count, _ = task.loss(model, split.join(trained), example_1xT, rng)
    return total / jnp.maximum(count, 1)

  from jax_privacy import clipping

  grad_fn = clipping.clipped_grad(
      example_loss, l2_clip_norm=dp.clip_norm, batch_argnums=1, prng_argnum=2, return_values=True,
      return_grad_norms=True, microbatch_size=dp.microbatch, spmd_axis_name=dp.batch_axes or None)
  grad_sum, aux = grad_fn(split.trained, examples, rng, is_padding_example=padding_B)
  keys = jax.random.split(jax.random.fold_in(rng, 0x5EED), len(grad_sum))
  std = dp.noise_multiplier * dp.clip_norm
  grads = [(g + (std * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)) / dp.expected_batch
           for g, k in zip(grad_sum, keys)]
  real_B = (~padding_B).astype(jnp.float32)
  num_real = real_B.sum()
  loss = (aux.values * real_B).sum() / jnp.maximum(num_real, 1)
  clipped = ((aux.grad_norms > dp.clip_norm) * real_B).sum() / jnp.maximum(num_real, 1)
  return loss, grads, {"dp_examples": num_real, "dp_clipped_fraction": clipped}

