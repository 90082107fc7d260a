"""GPT2LMHeadModel <-> tpu_lm: config fields and weights.

Hugging Face's GPT-2 stores its projections as Conv1D, [in, out], which is our
kernel layout already; the fused `c_attn` splits into query, key and value. Its
key bias is dropped on import (it adds q.b to every score of a query alike,
which softmax cancels) and written back as zeros.
"""

import numpy as np

from tpu_lm.errors import UserError

ARCHITECTURE = "GPT2LMHeadModel"
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def model_fields(hf: dict) -> dict:
  """Our `model` section for this Hugging Face config."""
  act = hf.get("activation_function", "gelu_new")
  if act not in _GELU_TANH:
    raise UserError(f"GPT-2 with activation_function={act!r} is not supported: tpu_lm's GELU is the tanh form ({', '.join(_GELU_TANH)}).")
  for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
    if hf.get(flag):
      raise UserError(f"GPT-2 with {flag}=true is not supported: only the standard GPT-2 attention is.")
  if hf.get("scale_attn_weights") is False:
    raise UserError("GPT-2 with scale_attn_weights=false is not supported: attention scores are scaled by 1/sqrt(head_dim).")
  d = hf["n_embd"]
  return {
      "num_layers": hf["n_layer"], "d_model": d, "num_heads": hf["n_head"], "num_kv_heads": 0, "head_dim": 0,
      "mlp_dim": hf.get("n_inner") or 4 * d, "max_len": hf["n_positions"], "norm": "layernorm",
      "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "position": "learned", "mlp": "gelu", "use_bias": True,
      "tie_embeddings": hf.get("tie_word_embeddings", True), "init_std": hf.get("initializer_range", 0.02),
  }


def hf_config(m, vocab_size: int, tokenizer, dtype: str) -> dict:
  bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
  return {
      "architectures": [ARCHITECTURE], "model_type": "gpt2", "vocab_size": vocab_size, "n_positions": m.max_len,
      "n_embd": m.d_model, "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.mlp_dim,
      "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps or 1e-5,
      "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings, "bos_token_id": bos_id,
      "eos_token_id": eos_id, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "dtype": dtype,
      "scale_attn_weights": True, "use_cache": True,
  }


def check_exportable(m) -> None:
  require(m, {"norm": "layernorm", "position": "learned", "mlp": "gelu", "use_bias": True, "norm_position": "pre",
                "head_transform": False}, "GPT-2", "Llama")
  if (m.num_kv_heads or m.num_heads) != m.num_heads or (m.head_dim and m.head_dim * m.num_heads != m.d_model):
    raise UserError("GPT-2 has neither grouped-query attention nor a separate head_dim: export it as Llama instead.")


def to_params(t: dict, m: dict, vocab_padded: int) -> dict:
  """Hugging Face tensors (names without the `transformer.` prefix) -> our per-layer params."""
  d = m["d_model"]
  params = {"embed": {"embedding": pad_rows(t["wte.weight"], vocab_padded)}, "pos_embed": t["wpe.weight"]}
  for i in range(m["num_layers"]):
    p = f"h.{i}."
    w, b = t[p + "attn.c_attn.weight"], t[p + "attn.c_attn.bias"]
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": t[p + "ln_1.weight"], "bias": t[p + "ln_1.bias"]},
        "attn": {
            "query": {"kernel": w[:, :d], "bias": b[:d]},
            "key": {"kernel": w[:, d:2 * d]},  # key bias dropped: softmax cancels it
            "value": {"kernel": w[:, 2 * d:], "bias": b[2 * d:]},
            "out": {"kernel": t[p + "attn.c_proj.weight"], "bias": t[p + "attn.c_proj.bias"]},
        },
        "mlp_norm": {"scale": t[p + "ln_2.weight"], "bias": t[p + "ln_2.bias"]},
        "mlp": {
            "up": {"kernel": t[p + "mlp.c_fc.weight"], "bias": t[p + "mlp.c_fc.bias"]},
            "down": {"kernel": t[p + "mlp.c_proj.weight"], "bias": t[p + "mlp.c_proj.bias"]},
        },
    }
  params["final_norm"] = {"scale": t["ln_f.weight"], "bias": t["ln_f.bias"]}
  if not m["tie_embeddings"]:
    params["unembed"] = {"kernel": pad_rows(t["lm_head.weight"], vocab_padded).T}
  return params


def from_params(params: dict, m, vocab_size: int) -> dict:
  """Our per-layer params -> GPT2LMHeadModel's state dict (numpy)."""
  out = {"transformer.wte.weight": params["embed"]["embedding"][:vocab_size], "transformer.wpe.weight": params["pos_embed"]}
  for i in range(m.num_layers):
    p, layer = f"transformer.h.{i}.", params[f"layers_{i}"]
    a, mlp = layer["attn"], layer["mlp"]
    q, v = a["query"], a["value"]
    out.update({
        p + "ln_1.weight": layer["attn_norm"]["scale"], p + "ln_1.bias": layer["attn_norm"]["bias"],
        p + "attn.c_attn.weight": np.concatenate([q["kernel"], a["key"]["kernel"], v["kernel"]], axis=1),
        p + "attn.c_attn.bias": np.concatenate([q["bias"], np.zeros_like(q["bias"]), v["bias"]]),
        p + "attn.c_proj.weight": a["out"]["kernel"], p + "attn.c_proj.bias": a["out"]["bias"],
        p + "ln_2.weight": layer["mlp_norm"]["scale"], p + "ln_2.bias": layer["mlp_norm"]["bias"],
        p + "mlp.c_fc.weight": mlp["up"]["kernel"], p + "mlp.c_fc.bias": mlp["up"]["bias"],
        p + "mlp.c_proj.weight": mlp["down"]["kernel"], p + "mlp.c_proj.bias": mlp["down"]["bias"],
    })
  out["transformer.ln_f.weight"] = params["final_norm"]["scale"]
  out["transformer.ln_f.bias"] = params["final_norm"]["bias"]
  if not m.tie_embeddings:
    out["lm_head.weight"] = params["unembed"]["kernel"][:, :vocab_size].T
  return out


def require(m, fields: dict, family: str, other: str) -> None:
  """UserError naming the first model field whose value `family` cannot hold."""
  for field, want in fields.items():
    if m[field] != want:
      raise UserError(f"model.{field}={m[field]!r} has no {family} equivalent (it needs {want!r}): a run that"
                      f" mixes the families exports as neither; {other} takes the other settings.")


def strip_prefix(tensors: dict) -> dict:
  """Checkpoints of GPT2LMHeadModel name tensors `transformer.h.0...`; those of the base
  GPT2Model (the original `gpt2` upload) `h.0...`."""
  return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """The vocabulary padded to the model's table size with zero rows (never predicted:
  the model masks logits past the tokenizer's vocabulary)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])
