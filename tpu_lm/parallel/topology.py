"""Cloud TPU slices by name (`v5p-64`, `v5e-16`, `v6e-256`, `v4-128`), as devices
a CPU machine can compile for.

`libtpu` (pip install 'jax[tpu]') describes any slice through
`jax.experimental.topologies.get_topology_desc` without the hardware; the devices
it returns build a Mesh like real ones, so the real train step lowers and
compiles for the real chip count, memory and interconnect.
"""

import dataclasses
import math
import re

from tpu_lm.errors import UserError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  generation: str  # as libtpu names it in topology strings
  hbm_bytes: int
  peak_bf16_flops: float
  cores_in_name: int  # v4/v5p names count TensorCores (2 per chip), v5e/v6e count chips
  dims: int  # the interconnect: a 3-D torus or a 2-D one


# Public per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, 3),
    "v5p": Chip("v5", 95 * GIB, 459e12, 2, 3),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # e.g. "v5p-64"
  chip: Chip
  shape: tuple[int, ...]  # chips along each torus axis
  chips_per_host: tuple[int, int, int]
  num_slices: int = 1

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape) * self.num_slices

  @property
  def num_hosts(self) -> int:
    return self.num_chips // math.prod(self.chips_per_host)

  @property
  def topology_name(self) -> str:
    return f"{self.chip.generation}:" + "x".join(map(str, self.shape))


def parse(name: str, num_slices: int = 1) -> Slice:
  """`v5p-64` -> its Slice; UserError naming the accepted forms otherwise."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
  if not m or num_slices < 1:
    raise UserError(
        f"--compile_for={name!r} (slices {num_slices}) is not a TPU slice this knows: use v4-N, v5p-N"
        " (N TensorCores, a power of two from 8) or v5e-N, v6e-N (N chips: 1, 4, 8 or a power of two"
        " up to 256), and --compile_slices >= 1."
    )
  chip = CHIPS[m.group(1)]
  n = int(m.group(2))
  chips = n // chip.cores_in_name
  power_of_two = chips >= 1 and chips & (chips - 1) == 0
  if chip.dims == 3 and (n % 2 or chips < 4 or not power_of_two):
    raise UserError(f"--compile_for={name}: {m.group(1)} slices are v{m.group(1)[1:]}-N with N = 8, 16, 32, ... TensorCores.")
  if chip.dims == 2 and (not power_of_two or chips == 2 or chips > 256):
    raise UserError(f"--compile_for={name}: {m.group(1)} slices have 1, 4, 8, 16, ... 256 chips.")
  shape = _torus(chips, chip.dims)
  if chip.dims == 2 and chips <= 8:
    per_host = (*shape, 1)  # v5e-1/4/8 and v6e-1/4/8 are single hosts
  else:
    per_host = (2, 2, 1)
  return Slice(name, chip, shape, per_host, num_slices)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's slice shapes: from the smallest one, double the shortest axis
  (the last of equals) until the chip count is reached: v5p-64 -> 2x4x4."""
  if dims == 2 and chips == 1:
    return (1, 1)
  shape = [2, 2, 1] if dims == 3 else [2, 2]
  while math.prod(shape) < chips:
    shortest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == shortest)
    shape[i] *= 2
  return tuple(shape)


def devices(s: Slice) -> list:
  """The slice's devices from libtpu's topology description (no TPU needed)."""
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - jax always has it
    raise UserError(f"this jax cannot describe TPU topologies ({e}): upgrade jax.") from e
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=s.topology_name,
        chip_config_name="megacore" if s.chip.dims == 3 else "default",
        chips_per_host_bounds=s.chips_per_host, num_slices=s.num_slices,
    )
  except Exception as e:  # libtpu missing, or too old for this chip
    raise UserError(
        f"cannot describe {s.name} ({str(e).strip().splitlines()[0][:200]}): --compile_for needs libtpu,"
        " installed by pip install 'jax[tpu]' (it is part of the test extra)."
    ) from e
  return list(desc.devices)
