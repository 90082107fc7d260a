"""LlamaForCausalLM <-> tpu_lm: config fields and weights.

PyTorch's Linear stores [out, in]; our kernels are [in, out], so every projection
is a transpose. Our RoPE is Hugging Face's rotate-half form, so query and key
weights need no permutation; grouped-query heads map kv head j to query heads
j*G .. j*G+G-1 in both.
"""

import numpy as np

from tpu_lm.errors import UserError
from tpu_lm.interop.gpt2 import pad_rows, require

ARCHITECTURE = "LlamaForCausalLM"
_PROJ = {"attn": {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
                  "out": "self_attn.o_proj"},
         "mlp": {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}}


def _rope(hf: dict) -> tuple[float, dict]:
  """(theta, scaling) from either layout: transformers 5's `rope_parameters`, or the
  older `rope_theta` + `rope_scaling` that most hub configs carry."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind == "default":
    return theta, {"type": "none"}
  if kind != "llama3":
    raise UserError(f"Llama with RoPE scaling {kind!r} is not supported: tpu_lm has the default and 'llama3' scaling.")
  return theta, {
      "type": "llama3", "factor": float(merged["factor"]), "low_freq_factor": float(merged["low_freq_factor"]),
      "high_freq_factor": float(merged["high_freq_factor"]),
      "original_max_len": int(merged["original_max_position_embeddings"]),
  }


def model_fields(hf: dict) -> dict:
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"Llama with hidden_act={hf['hidden_act']!r} is not supported: tpu_lm's SwiGLU uses silu.")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise UserError(f"Llama with {flag}=true is not supported: tpu_lm's Llama block has no biases.")
  heads, d = hf["num_attention_heads"], hf["hidden_size"]
  theta, scaling = _rope(hf)
  return {
      "num_layers": hf["num_hidden_layers"], "d_model": d, "num_heads": heads,
      "num_kv_heads": hf.get("num_key_value_heads") or heads, "head_dim": hf.get("head_dim") or d // heads,
      "mlp_dim": hf["intermediate_size"], "max_len": hf["max_position_embeddings"], "norm": "rmsnorm",
      "norm_eps": hf.get("rms_norm_eps", 1e-6), "position": "rope", "rope_theta": float(theta),
      "rope_scaling": scaling, "mlp": "swiglu", "use_bias": False,
      "tie_embeddings": hf.get("tie_word_embeddings", False), "init_std": hf.get("initializer_range", 0.02),
  }


def hf_config(m, vocab_size: int, tokenizer, dtype: str) -> dict:
  bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
  head_dim = m.head_dim or m.d_model // m.num_heads
  rope = {"rope_type": "default", "rope_theta": m.rope_theta}
  s = m.rope_scaling
  if s.type == "llama3":
    rope = {"rope_type": "llama3", "rope_theta": m.rope_theta, "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_len}
  return {
      "architectures": [ARCHITECTURE], "model_type": "llama", "vocab_size": vocab_size, "hidden_size": m.d_model,
      "intermediate_size": m.mlp_dim, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads or m.num_heads, "head_dim": head_dim,
      "max_position_embeddings": m.max_len, "rms_norm_eps": m.norm_eps or 1e-6, "hidden_act": "silu",
      # Both layouts of the RoPE settings: transformers 5 reads rope_parameters, 4.x rope_theta/rope_scaling.
      "rope_parameters": rope, "rope_theta": m.rope_theta,
      "rope_scaling": None if s.type == "none" else {k: v for k, v in rope.items() if k != "rope_theta"},
      "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": m.tie_embeddings,
      "initializer_range": m.init_std, "bos_token_id": bos_id, "eos_token_id": eos_id, "dtype": dtype,
      "use_cache": True,
  }


def check_exportable(m) -> None:
  require(m, {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "use_bias": False, "norm_position": "pre",
                "head_transform": False}, "Llama", "GPT-2")


def to_params(t: dict, m: dict, vocab_padded: int) -> dict:
  params = {"embed": {"embedding": pad_rows(t["model.embed_tokens.weight"], vocab_padded)}}
  for i in range(m["num_layers"]):
    p = f"model.layers.{i}."
    layer = {"attn_norm": {"scale": t[p + "input_layernorm.weight"]},
             "mlp_norm": {"scale": t[p + "post_attention_layernorm.weight"]}}
    for group, names in _PROJ.items():
      layer[group] = {ours: {"kernel": t[f"{p}{theirs}.weight"].T} for ours, theirs in names.items()}
    params[f"layers_{i}"] = layer
  params["final_norm"] = {"scale": t["model.norm.weight"]}
  if not m["tie_embeddings"]:
    params["unembed"] = {"kernel": pad_rows(t["lm_head.weight"], vocab_padded).T}
  return params


def permute_rope(w_OxI: np.ndarray, heads: int) -> np.ndarray:
  """A query or key projection's rows ([heads * D, in]; a bias as [heads * D, 1]) from
  our rotate-half pairs (i, i + D/2) to interleaved pairs (2i, 2i + 1), head by head:
  llama.cpp's RoPE (its converter's `permute`) and RoFormer's."""
  out, d_in = w_OxI.shape
  return w_OxI.reshape(heads, 2, out // heads // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def from_params(params: dict, m, vocab_size: int) -> dict:
  out = {"model.embed_tokens.weight": params["embed"]["embedding"][:vocab_size]}
  for i in range(m.num_layers):
    p, layer = f"model.layers.{i}.", params[f"layers_{i}"]
    out[p + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
    out[p + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    for group, names in _PROJ.items():
      for ours, theirs in names.items():
        out[f"{p}{theirs}.weight"] = layer[group][ours]["kernel"].T
  out["model.norm.weight"] = params["final_norm"]["scale"]
  if not m.tie_embeddings:
    out["lm_head.weight"] = params["unembed"]["kernel"][:, :vocab_size].T
  return out
