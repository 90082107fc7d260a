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
DCN_AXES = tuple(f"dcn_{a}" for a in AXES)
# Named ICI layouts; `mesh.preset` picks one, "" keeps mesh.data/fsdp/tensor as written.
PRESETS = {
    "data_parallel": {"data": -1, "fsdp": 1, "tensor": 1},  # params replicated, batch split
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},  # params and optimizer state split too
    "fsdp_tensor": {"data": 1, "fsdp": -1},  # + heads/MLP split over mesh.tensor devices
}


def mesh_sizes(mesh_cfg) -> dict[str, int]:
  """The config's `mesh` section (preset applied) as {axis: size} for ICI and DCN axes."""
  sizes = {a: mesh_cfg[a] for a in AXES}
  sizes.update({a: mesh_cfg.get(a, 1) for a in DCN_AXES})
  preset = mesh_cfg.get("preset", "")
  if preset:
    if preset not in PRESETS:
      raise UserError(
          f"config field mesh.preset is {preset!r}: use one of '', " + ", ".join(repr(p) for p in PRESETS) + "."
      )
    if preset == "fsdp_tensor" and sizes["tensor"] < 2:
      raise UserError(
          "config field mesh.tensor is {}: mesh.preset='fsdp_tensor' needs the tensor-parallel size"
          " there, e.g. --config.mesh.tensor=4.".format(sizes["tensor"])
      )
    sizes.update(PRESETS[preset])
  return sizes


def _fill(sizes: dict[str, int], axes, total: int, what: str) -> tuple[int, ...]:
  """Sizes of `axes` with a -1 filled in; UserError when they do not multiply to `total`."""
  fixed = math.prod(sizes[a] for a in axes if sizes[a] != -1)
  named = {a: sizes[a] for a in axes}
  if any(sizes[a] == -1 for a in axes):
    if total % fixed:
      raise UserError(
          f"mesh axes {named} cannot fill {total} {what}: the fixed axes"
          f" multiply to {fixed}, which does not divide {total}."
      )
    named = {a: (total // fixed if s == -1 else s) for a, s in named.items()}
  if math.prod(named.values()) != total:
    raise UserError(
        f"mesh {named} has {math.prod(named.values())} {what} but {total} are available: make "
        + " * ".join(f"mesh.{a}" for a in axes) + " equal that, or set one to -1."
    )
  return tuple(named.values())


def mesh_shape(sizes: dict[str, int], num_devices: int, num_slices: int = 1) -> tuple[int, ...]:
  """Full axis sizes (ICI x DCN) with any -1 filled in; UserError when they do not fit."""
  dcn = dcn_shape(sizes, num_slices)
  ici = _fill(sizes, AXES, num_devices // math.prod(dcn), "devices per slice" if num_slices > 1 else "devices")
  return tuple(i * d for i, d in zip(ici, dcn))


def dcn_shape(sizes: dict[str, int], num_slices: int) -> tuple[int, ...]:
  """How many slices (TPU) or hosts (GPU) each axis spans; (1, 1, 1) within one."""
  dcn = {f"dcn_{a}": sizes.get(f"dcn_{a}", 1) for a in AXES}
  if list(dcn.values()).count(-1) > 1:
    raise UserError("only one of mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor may be -1.")
  return _fill(dcn, DCN_AXES, num_slices, "slices")


def granule(device) -> int:
  """A TPU device's slice; elsewhere its process (a GPU node, a CPU process)."""
  slice_index = getattr(device, "slice_index", None)
  return device.process_index if slice_index is None else slice_index


def make_mesh(sizes: dict[str, int], devices=None) -> Mesh:
  """A Mesh over `devices` with axes AXES; each axis is ICI size x DCN size long.

  Within a slice, devices are ordered by `mesh_utils.create_device_mesh` (which
  follows the physical torus on TPU); across slices (`dcn_*` > 1) they are
  grouped so that only the DCN part of each axis crosses slices, whose links are
  slower. Without dcn_* every device is in one ICI mesh, as on one slice or host.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn_asked = any(sizes.get(a, 1) != 1 for a in DCN_AXES)
  groups: dict[int, list] = {}
  for d in devices:
    groups.setdefault(granule(d) if dcn_asked else 0, []).append(d)
  dcn = dcn_shape(sizes, len(groups))
  ici = _fill(sizes, AXES, len(devices) // len(groups), "devices per slice" if dcn_asked else "devices")
  if len({len(g) for g in groups.values()}) > 1:
    raise UserError(f"the {len(groups)} slices/processes have different device counts: a DCN mesh needs equal ones.")
  grids = [_device_mesh(ici, g) for _, g in sorted(groups.items())]
  # [dcn_d, dcn_f, dcn_t, ici_d, ici_f, ici_t] -> [d, f, t], the slice index outermost in each axis.
  arr = np.stack(grids).reshape(*dcn, *ici).transpose(0, 3, 1, 4, 2, 5)
  return Mesh(arr.reshape([a * b for a, b in zip(dcn, ici)]), AXES)


def _device_mesh(shape, devices) -> np.ndarray:
  if devices and devices[0].platform == "tpu":
    from jax.experimental import mesh_utils

    try:
      return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError):
      pass  # a shape the torus-aware layout does not handle: plain order still works
  return np.asarray(devices).reshape(shape)


def rules_tuple(rules) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def logical_sharding(tree_of_specs, mesh: Mesh, rules):
  """Logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(tree_of_specs, mesh, rules_tuple(rules))


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Every batch field split by rows over the batch axes: valid at any rank (token
  fields [B, T], a classifier's labels [B]); inside the model the activations take
  their own logical constraints."""
  return logical_sharding(P("act_batch"), mesh, rules)


def fit_shardings(shardings, abstract_tree):
  """Each sharding made valid for its array: a spec longer or shorter than the array's
  rank replicates it, and an axis that does not divide its dimension is dropped.

  For derived arrays (optimizer statistics) whose logical names come from a
  parameter but whose shapes need not: Adafactor's factored moments are vectors,
  its unused slots have shape (1,). They are small, so replicating them is cheap.
  """
  def fit(sharding, leaf):
    spec = tuple(sharding.spec)
    if len(spec) != len(leaf.shape):
      return NamedSharding(sharding.mesh, P())
    kept = [axes if axes is None or dim % _axes_size(sharding.mesh, axes) == 0 else None
            for dim, axes in zip(leaf.shape, spec)]
    return NamedSharding(sharding.mesh, P(*kept))

  return jax.tree.map(fit, shardings, abstract_tree, is_leaf=lambda x: isinstance(x, NamedSharding))


def _axes_size(mesh, axes) -> int:
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


class context:
  """Mesh and logical axis rules, entered together: what a model's sharding
  constraints read while it is traced."""

  def __init__(self, mesh: Mesh, rules):
    self._managers = (jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules_tuple(rules)))

  def __enter__(self):
    for m in self._managers:
      m.__enter__()

  def __exit__(self, *exc):
    for m in reversed(self._managers):
      m.__exit__(*exc)


def check_heads(num_heads: int, num_kv_heads: int, mesh: Mesh, rules) -> None:
  """UserError unless the mesh axes that split attention heads divide both head counts
  (heads are a reshape of the projections' outputs, so the kernels alone cannot show it)."""
  axes = nn.logical_to_mesh_axes(("act_heads",), rules_tuple(rules))[0]
  n = 1 if axes is None else _axes_size(mesh, axes)
  for field, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
    if heads % n:
      raise UserError(
          f"config field model.{field} is {heads}: attention heads cannot be split over mesh axes {axes}"
          f" ({n} devices); choose a head count divisible by {n} or a smaller mesh.tensor."
      )


def check_divisible(abstract_tree, shardings) -> None:
  """UserError naming the first parameter whose dims the mesh axes do not divide."""
  flat_shapes = jax.tree_util.tree_leaves_with_path(abstract_tree)
  flat_shardings = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat_shapes, flat_shardings):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      n = _axes_size(sharding.mesh, axes)
      if dim % n:
        raise UserError(
            f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split"
            f" over mesh axes {axes} ({n} devices): choose model sizes divisible by {n}"
            " or a different mesh."
        )
