"""Which parameters a run trains: all of them, all but those `optim.freeze` matches,
or with LoRA only the adapters (and a classification head or a vision encoder, new to
the decoder anyway).

Frozen parameters get no optimizer state and no update (`optax.multi_transform`
with `optax.set_to_zero`), and the step differentiates with respect to the trained
leaves alone (`Split`), so XLA computes no gradient for a frozen one: under DP-SGD
an example's clipped norm is its trained leaves' gradient norm, and the logged
gradient norm is theirs.
"""

import dataclasses

import re

import jax
import numpy as np

from tpu_lm.model import lora

# Trained in full under LoRA: a task's fresh head, and the image half of a model that
# reads images (new to the text decoder that LoRA adapts; optim.freeze can still freeze it).
HEADS = ("cls_head/", "vision_encoder/")


def param_path(path) -> str:
  """'layers_0/attn/query/kernel': the dict keys of a tree path (Flax's partitioning
  boxes add attribute keys, which are skipped)."""
  return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def mask(params, freeze=(), lora_rank: int = 0):
  """A tree of bools like `params` (boxed or not): True where the parameter trains."""
  patterns = [re.compile(p) for p in freeze]

  def trains(path, _):
    name = param_path(path)
    if any(p.fullmatch(name) for p in patterns):
      return False
    return not lora_rank or lora.is_adapter(name) or name.startswith(HEADS)

  return jax.tree_util.tree_map_with_path(trains, params)


@dataclasses.dataclass(frozen=True)
class Split:
  """A parameter tree cut into the leaves that train and the frozen rest:
  `jax.grad(lambda t: f(split.join(t)))(split.trained)` differentiates the trained
  leaves only, the frozen ones entering as constants."""

  trained: list
  frozen: list
  flags: tuple  # per leaf of the tree, in order: True where it trains
  treedef: object

  @classmethod
  def of(cls, params, trainable) -> "Split":
    leaves, treedef = jax.tree.flatten(params)
    flags = tuple(bool(t) for t in jax.tree.leaves(trainable)) if trainable is not None else (True,) * len(leaves)
    return cls([x for x, t in zip(leaves, flags) if t], [x for x, t in zip(leaves, flags) if not t], flags, treedef)

  def join(self, trained: list, frozen: list | None = None):
    """The whole tree from trained leaves (and the frozen ones, default this split's)."""
    it_trained, it_frozen = iter(trained), iter(self.frozen if frozen is None else frozen)
    return self.treedef.unflatten([next(it_trained) if t else next(it_frozen) for t in self.flags])

  def full_grads(self, trained_grads: list):
    """Gradients as a whole tree: zeros where frozen (the optimizer discards them)."""
    import jax.numpy as jnp

    return self.join(trained_grads, [jnp.zeros_like(x) for x in self.frozen])


def summary(abstract_params, trainable, abstract_opt_state) -> str:
  """'trainable 12,345 of 1,209,120 parameters (1.0%); optimizer state 0.1 MiB'."""
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params)]
  flags = jax.tree.leaves(trainable)
  n_train = sum(s for s, t in zip(sizes, flags) if t)
  opt_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_opt_state))
  total = sum(sizes)
  return (f"trainable {n_train:,} of {total:,} parameters ({100 * n_train / max(total, 1):.1f}%);"
          f" optimizer state {opt_bytes / 2**20:,.1f} MiB")


def frozen_names(params, trainable) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [param_path(p) for (p, _), t in zip(leaves, jax.tree.leaves(trainable)) if not t]
