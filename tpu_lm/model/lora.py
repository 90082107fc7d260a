"""LoRA adapters on the model's projections, through Qwix, and merging them back.

Qwix's LoraProvider intercepts the matmul of every `nn.Dense` whose module path
matches the targets and adds (alpha / rank) * x A B, with A [in, r] (He-uniform)
and B [r, out] (zeros), stored next to the kernel as `kernel_lora_a` /
`kernel_lora_b`. B starts at zero, so an adapted model starts as the model.
"""

import re

import jax
import jax.numpy as jnp

SUFFIXES = ("kernel_lora_a", "kernel_lora_b")
# The model's methods that run projections: all of them must be intercepted.
METHODS = ("__call__", "hidden", "logits", "classify")


def apply(model, *, rank: int, alpha: float, targets: str):
  """The model with adapters on every projection whose module path (e.g.
  `layers_0/attn/query`) matches `targets` in full."""
  import qwix

  provider = qwix.LoraProvider(module_path=targets, rank=rank, alpha=alpha)
  return qwix.apply_lora_to_model(model, provider, methods=METHODS)


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in SUFFIXES


def merge(params: dict, *, rank: int, alpha: float) -> dict:
  """Adapters folded into their kernels, W + (alpha / rank) A B; the plain model's tree.

  The product is taken in float32, then cast to the kernel's dtype.
  """
  scale = alpha / rank

  def walk(node):
    if not isinstance(node, dict):
      return node
    out = {k: walk(v) for k, v in node.items() if k not in SUFFIXES}
    if "kernel_lora_a" in node:
      a, b = (jnp.asarray(node[k], jnp.float32) for k in SUFFIXES)
      out["kernel"] = node["kernel"] + (a @ b * scale).astype(node["kernel"].dtype)
    return out

  return walk(params)


def adapted_paths(params: dict) -> list[str]:
  """The module paths that carry adapters, e.g. ['layers_0/attn/query', ...]."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sorted({re.sub(r"/kernel_lora_[ab]$", "", _path(p)) for p, _ in flat if is_adapter(_path(p))})


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)
