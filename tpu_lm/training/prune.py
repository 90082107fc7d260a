"""Pruning: masks on the projection kernels, kept in the optimizer state.

Masks are chosen by magnitude (the smallest |w| of each kernel go), either
unstructured to a sparsity or N:M structured (in every group of M consecutive
input weights of an output, the N largest stay: 2:4 is what sparse tensor cores
run). `masked` wraps an Optax transformation: its state holds the masks and the
update leaves every pruned weight exactly zero, so masks survive updates and
checkpoints (they are part of the train state). Gradual magnitude pruning (Zhu &
Gupta, 2017) raises the sparsity along s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3
from step t0 to t1, recomputing the masks every `every` steps and at t1.

Hand-written: jaxpruner, the JAX library for this, calls APIs jax 0.10 removed.
"""

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tpu_lm.errors import UserError


@dataclasses.dataclass(frozen=True)
class Spec:
  """The config's `prune` section: what is pruned, how much, and when."""

  sparsity: float = 0.0  # the final fraction of each targeted kernel that is zero
  n_m: str = ""  # "N:M" structured instead, e.g. "2:4" (sparsity N/M is then implied)
  begin_step: int = 0  # masks are first computed at this update
  end_step: int = 0  # gradual: the sparsity reaches its target here (= begin: one shot)
  every: int = 100  # gradual: masks are recomputed every this many updates
  targets: str = r"layers_\d+/.*/kernel"  # parameter paths pruned (the blocks' projections)

  @classmethod
  def from_config(cls, prune) -> "Spec":
    return cls(prune.sparsity, prune.n_m, prune.begin_step, prune.end_step, prune.every, prune.targets)

  @property
  def active(self) -> bool:
    return bool(self.sparsity or self.n_m)

  def nm(self) -> tuple[int, int]:
    n, m = (int(x) for x in self.n_m.split(":"))
    return n, m


def path_of(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def targeted(params, targets: str):
  """A tree of bools: the parameters `targets` names in full (2-D kernels only)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: bool(re.fullmatch(targets, path_of(p))) and x.ndim == 2, params)


def magnitude_mask(w_IxO, sparsity):
  """Drops exactly floor(sparsity x size) weights of the kernel, the smallest |w| first
  (ties by position): weights already zero go first, so they never grow back."""
  if isinstance(sparsity, (int, float)) and sparsity == 0:
    return jnp.ones(w_IxO.shape, jnp.bool_)
  flat = jnp.abs(w_IxO).reshape(-1)
  rank = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)  # 0 = smallest
  k = jnp.floor(sparsity * flat.size).astype(jnp.int32)
  return (rank >= k).reshape(w_IxO.shape)


def nm_mask(w_IxO, n: int, m: int):
  """In each group of m consecutive input rows of every output column, the n largest |w| stay."""
  i, o = w_IxO.shape
  if i % m:
    raise UserError(f"N:M pruning with M={m} needs input widths divisible by {m}; a kernel has {i} rows.")
  groups = jnp.abs(w_IxO).reshape(i // m, m, o)
  rank = jnp.argsort(jnp.argsort(-groups, axis=1, stable=True), axis=1, stable=True)  # 0 = largest in its group
  return (rank < n).reshape(i, o)


def sparsity_at(spec: Spec, step):
  """The gradual schedule's sparsity after `step` updates (0 before begin_step)."""
  if spec.end_step == spec.begin_step:
    return jnp.where(step >= spec.begin_step, spec.sparsity, 0.0)
  frac = jnp.clip((step - spec.begin_step) / (spec.end_step - spec.begin_step), 0.0, 1.0)
  return jnp.where(step >= spec.begin_step, spec.sparsity * (1 - (1 - frac) ** 3), 0.0)


def masks_for(params, spec: Spec, sparsity=None, is_target=None):
  """Masks (bool) for the targeted kernels, all-True elsewhere."""
  is_target = targeted(params, spec.targets) if is_target is None else is_target
  s = spec.sparsity if sparsity is None else sparsity

  def one(w, t):
    if not t:
      return jnp.ones(w.shape, jnp.bool_)
    return nm_mask(w, *spec.nm()) if spec.n_m else magnitude_mask(w, s)

  return jax.tree.map(one, params, is_target)


def prune(params, spec: Spec):
  """One-shot: the parameters with the pruned weights set to zero."""
  masks = masks_for(params, spec)
  return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)


class MaskedState(NamedTuple):
  inner: optax.OptState
  masks: optax.Params  # bool per weight (all True where not pruned)
  count: jax.Array  # updates applied


def masked(inner: optax.GradientTransformation, spec: Spec) -> optax.GradientTransformation:
  """`inner`, then every pruned weight held at zero; masks recomputed on schedule."""

  def init(params):
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), params)
    return MaskedState(inner.init(params), masks, jnp.zeros((), jnp.int32))

  def update(updates, state, params):
    updates, inner_state = inner.update(updates, state.inner, params)
    new = optax.apply_updates(params, updates)
    step = state.count
    is_target = targeted(params, spec.targets)
    # Recompute at begin_step, then every `every` updates, and at end_step whatever
    # `every` is (else a schedule whose length is no multiple of it stops short of the
    # target); N:M once, at begin_step.
    last = spec.begin_step if spec.n_m else spec.end_step
    due = (step >= spec.begin_step) & (step <= last) & (((step - spec.begin_step) % spec.every == 0) | (step == last))
    masks = jax.lax.cond(due, lambda: masks_for(new, spec, sparsity_at(spec, step), is_target),
                         lambda: state.masks)
    new = jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), new, masks)
    return jax.tree.map(lambda n, p: n - p, new, params), MaskedState(inner_state, masks, step + 1)

  return optax.GradientTransformation(init, update)


def report(params, spec: Spec) -> dict:
  """Achieved sparsity: per targeted kernel, over the targets, and over all parameters."""
  is_target = targeted(params, spec.targets)
  per_layer, zeros, total, all_zeros, all_total = {}, 0, 0, 0, 0
  for (path, w), t in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(is_target)):
    w = np.asarray(w)
    z = int(np.sum(w == 0))
    all_zeros, all_total = all_zeros + z, all_total + w.size
    if t:
      per_layer[path_of(path)] = z / w.size
      zeros, total = zeros + z, total + w.size
  return {"per_layer": per_layer, "targets": zeros / max(total, 1), "overall": all_zeros / max(all_total, 1)}


def valid_nm(w_IxO, n: int, m: int) -> bool:
  """Every group of m consecutive input weights of each output has at most n non-zeros."""
  w = np.asarray(w_IxO)
  i, o = w.shape
  return bool(np.all(np.sum(w.reshape(i // m, m, o) != 0, axis=1) <= n))
