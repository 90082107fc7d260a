"""Weight quantization of a model's projections through Qwix, and its saved form.

Qwix intercepts every `nn.Dense` (the one projection layer, model/layers.py): with a
`PtqProvider` the kernels become `QArray`s (integer values + float scales; per output
channel, or per group of `tile_size` input rows for int4), and activations can be
quantized to int8 on the fly too. With a `QtProvider` the same rules fake-quantize in
the forward pass and pass gradients straight through (quantization-aware training).

On disk a quantized kernel is {"qvalue", "scale"}: int8 values as int8, int4 values
packed two to a byte (uint8), so the checkpoint's size is the integer size, not the
float one. `saved_form` / `from_saved` convert between Qwix's tree and that.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.errors import UserError

# The model's methods that run projections: all must be intercepted (as for LoRA).
METHODS = ("__call__", "hidden", "logits", "classify")
WEIGHT_TYPES = ("int8", "int4")


@dataclasses.dataclass(frozen=True)
class Spec:
  """How a run's projections are quantized (the config's `quant` section)."""

  weight_qtype: str = ""  # "" (none), "int8" or "int4"
  tile_size: int = 0  # int4: input rows per scale group (0: one scale per output channel)
  act_qtype: str = ""  # "" or "int8": activations quantized at each matmul too
  targets: str = r"layers_\d+/.*|unembed"  # module paths whose kernels are quantized (config quant.targets)

  @classmethod
  def from_config(cls, quant) -> "Spec":
    return cls(quant.weight_qtype, quant.tile_size, quant.act_qtype, quant.targets)

  def rules(self):
    import qwix

    return [qwix.QuantizationRule(module_path=self.targets, weight_qtype=self.weight_qtype,
                                  act_qtype=self.act_qtype or None, tile_size=self.tile_size or None)]


def ptq_model(model, spec: Spec):
  """`model` serving quantized kernels (post-training quantization)."""
  import qwix

  return qwix.quantize_model(model, qwix.PtqProvider(spec.rules()), methods=METHODS)


def qat_model(model, spec: Spec):
  """`model` fake-quantizing as `spec` says, with straight-through gradients."""
  import qwix

  return qwix.quantize_model(model, qwix.QtProvider(spec.rules()), methods=METHODS)


def abstract_quantized(qmodel, seq_len: int = 8):
  """The quantized model's parameter tree (QArrays of ShapeDtypeStructs), unallocated."""
  import flax.linen as nn

  dummy = jnp.zeros((1, seq_len), jnp.int32)
  return nn.unbox(jax.eval_shape(lambda: qmodel.init(jax.random.key(0), dummy, dummy, dummy))["params"])


def quantize(params, qmodel, spec: Spec):
  """Float parameters -> the quantized model's parameters (Qwix's absmax calibration)."""
  import flax.linen as nn
  import qwix

  params = jax.tree.map(jnp.asarray, nn.unbox(params))  # (Qwix takes jax arrays only)
  abstract = abstract_quantized(qmodel)
  _check_tiles(abstract, spec)
  return qwix.quantize_params(params, abstract)


def _check_tiles(abstract, spec: Spec) -> None:
  if not spec.tile_size:
    return
  for path, node in _quantized_nodes(abstract):
    rows = node.array.qvalue.shape[0]
    if rows % spec.tile_size:
      raise UserError(f"quant.tile_size={spec.tile_size} does not divide the {rows} input rows of {path}:"
                      " choose a tile size that divides every projection's input width.")


def _is_withaux(x) -> bool:
  return type(x).__name__ == "WithAux" and hasattr(x, "array")


def _quantized_nodes(tree, prefix=""):
  if _is_withaux(tree):
    yield prefix, tree
  elif isinstance(tree, dict):
    for k, v in tree.items():
      yield from _quantized_nodes(v, f"{prefix}/{k}" if prefix else k)


def _pack_int4(q) -> np.ndarray:
  flat = (np.asarray(q, np.int8).reshape(-1) + 8).astype(np.uint8)
  if flat.size % 2:
    flat = np.append(flat, np.uint8(8))
  return flat[0::2] | (flat[1::2] << 4)


def _unpack_int4(packed, shape) -> jax.Array:
  packed = np.asarray(packed, np.uint8)
  flat = np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)[: int(np.prod(shape))]
  return jnp.asarray((flat.astype(np.int8) - 8).reshape(shape), jnp.int4)


def _on_kernels(fn, tree, *rest, others=lambda x, *_: x):
  """`fn(kernel, *rest_at_it)` at every quantized kernel of `tree`, `others` at every
  other leaf; `rest` are trees with `tree`'s structure down to its kernels."""
  return jax.tree.map(lambda n, *r: fn(n, *r) if _is_withaux(n) else others(n, *r), tree, *rest,
                      is_leaf=_is_withaux)


def saved_form(qparams) -> dict:
  """Qwix's tree -> plain arrays: each quantized kernel {"qvalue", "scale"} (int4 packed)."""
  def one(node):
    q = node.array
    qvalue = _pack_int4(q.qvalue) if q.qtype == "int4" else np.asarray(q.qvalue)
    return {"qvalue": qvalue, "scale": np.asarray(q.scale)}

  return _on_kernels(one, qparams)


def saved_abstract(abstract) -> dict:
  """The saved form's shapes and dtypes, for a partial Orbax restore."""
  def one(node):
    q = node.array
    if q.qtype == "int4":
      qvalue = jax.ShapeDtypeStruct(((int(np.prod(q.qvalue.shape)) + 1) // 2,), np.uint8)
    else:
      qvalue = jax.ShapeDtypeStruct(q.qvalue.shape, q.qvalue.dtype)
    return {"qvalue": qvalue, "scale": jax.ShapeDtypeStruct(q.scale.shape, q.scale.dtype)}

  return _on_kernels(one, abstract)


def from_saved(saved, abstract):
  """The saved form -> Qwix's tree, shaped like `abstract`."""
  def one(node, s):
    q = node.array
    qvalue = _unpack_int4(s["qvalue"], q.qvalue.shape) if q.qtype == "int4" else jnp.asarray(s["qvalue"])
    return dataclasses.replace(node, array=dataclasses.replace(q, qvalue=qvalue, scale=jnp.asarray(s["scale"])))

  return _on_kernels(one, abstract, saved, others=lambda _, s: s)


def dequantize(qparams):
  """Quantized kernels back to float (what the quantized model computes with)."""
  import qwix

  return _on_kernels(lambda node: qwix.dequantize(node.array), qparams)


def bits_per_weight(qparams) -> float:
  """Stored bits per model parameter, scales and unquantized parameters included."""
  stored = sum(np.asarray(x).nbytes * 8 for x in jax.tree.leaves(saved_form(qparams)))
  weights = sum(int(np.prod(n.array.qvalue.shape)) for _, n in _quantized_nodes(qparams))
  others = sum(np.asarray(x).size for x in jax.tree.leaves(_on_kernels(lambda _: None, qparams)))
  return stored / (weights + others)
