"""Parameter trees: counts, the scanned <-> per-layer layouts, and the abstract
(shape-only) parameters of a model with their logical partition specs."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def num_params(params, *, exclude_positions: bool = False) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return sum(
      x.size for path, x in leaves
      if not (exclude_positions and "pos_embed" in jax.tree_util.keystr(path))
  )


def stack_layers(params: dict, num_layers: int) -> dict:
  """Per-layer params (`layers_0`, ...) -> the scanned layout (`layers`, leading axis)."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(
      lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(num_layers)]
  )
  return out


def unstack_layers(params: dict) -> dict:
  """The scanned layout -> per-layer params; inverse of `stack_layers`."""
  out = {k: v for k, v in params.items() if k != "layers"}
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


def init_params(model: nn.Module, rng, seq_len: int):
  """The model's parameters, still in their logical-partitioning boxes."""
  dummy_1xT = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, dummy_1xT, dummy_1xT, dummy_1xT)["params"]


def abstract_params(model: nn.Module, seq_len: int = 8):
  """(ShapeDtypeStructs of the parameters, their logical PartitionSpecs), without
  allocating anything. Trace under the mesh's logical rules."""
  boxed = jax.eval_shape(lambda rng: init_params(model, rng, seq_len), jax.random.key(0))
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  # Taken out of the boxes by hand: nn.meta.unbox would add sharding constraints.
  abstract = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed, is_leaf=is_box)
  return abstract, nn.get_partition_spec(boxed)


def schedule_free_average(y, z, b1):
  """Schedule-free AdamW's model x = (y - (1 - b1) z) / b1 from its trained iterate y and
  the optimizer's z (Defazio et al. 2024), in y's dtype. Here, not beside the optimizer,
  because inference reads schedule-free runs without importing training."""
  return ((y - (1 - b1) * z) / b1).astype(y.dtype)
