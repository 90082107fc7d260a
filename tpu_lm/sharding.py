"""The device mesh and the map from logical axis names to it.

`jax.jit` over a `Mesh` with `NamedSharding`s is JAX's current form of pmap:
with every device on the `data` axis (the default) it is pure data parallelism;
putting devices on `fsdp` shards parameters and optimizer state across them, and
`tensor` splits heads and MLP columns. Only the config changes, never the code.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tpu_lm.errors import UserError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes with a -1 filled in; UserError when they do not multiply to num_devices."""
  fixed = math.prod(s for s in sizes.values() if s != -1)
  shape = []
  for axis in AXES:
    s = sizes[axis]
    if s == -1:
      if num_devices % fixed:
        raise UserError(
            f"mesh axes {dict(sizes)} cannot fill {num_devices} devices: the fixed axes"
            f" multiply to {fixed}, which does not divide {num_devices}."
        )
      s = num_devices // fixed
    shape.append(s)
  if math.prod(shape) != num_devices:
    raise UserError(
        f"mesh {dict(zip(AXES, shape))} has {math.prod(shape)} devices but {num_devices} are"
        " available: make mesh.data * mesh.fsdp * mesh.tensor equal that, or set one to -1."
    )
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(sizes, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def rules_tuple(rules) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_sharding(tree_of_specs, mesh: Mesh, rules):
  """Logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(tree_of_specs, mesh, rules_tuple(rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  return logical_sharding(P("act_batch", "act_length"), mesh, rules)


def check_divisible(abstract_tree, shardings) -> None:
  """UserError naming the first parameter whose dims the mesh axes do not divide."""
  flat_shapes = jax.tree_util.tree_leaves_with_path(abstract_tree)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat_shapes, flat_shardings):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      n = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % n:
        raise UserError(
            f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split"
            f" over mesh axes {axes} ({n} devices): choose model sizes divisible by {n}"
            " or a different mesh."
        )
