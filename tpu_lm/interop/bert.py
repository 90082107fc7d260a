"""BertForMaskedLM, BertModel and RobertaForMaskedLM <-> tpu_lm: config fields and weights.

The three are one layout (model.bert_block's): learned absolute positions, post-norm
blocks after a LayerNorm of the embeddings, exact GELU, biases, and (the masked-LM
heads) a prediction head of dense + GELU + LayerNorm under the tied embedding, with a
bias on the vocabulary. What differs is naming and positions:

- Token types: tpu_lm has none (one text per row). Every text reads token type 0, so
  its embedding is folded into the position table on import; the export writes a zero
  type table (BERT's two rows, RoBERTa's one), which transformers adds to nothing.
- RoBERTa numbers positions from its padding id + 1 (it counts non-padding tokens):
  the table's first pad_id + 1 rows are never read by a text and are dropped on import
  (written back as zeros); max_len is the rest.
- BertModel (no masked-LM head; its pooler, trained for next-sentence prediction, is
  not read): the encoder imports whole with a fresh, seeded prediction head, so the run
  embeds, classifies and fine-tunes, and fills masks only after masked-LM training.
- The key bias is dropped, as GPT-2's (softmax cancels it), and written back as zeros.
- RoFormerForMaskedLM (export only): BERT with rotary positions in attention instead of
  a position table, the layout of configs/encoder.py. Its rotation pairs dimensions
  (2j, 2j+1) of a head where ours (rotate-half, as Llama's) pairs (j, j + H/2), at the
  same frequencies: the query and key columns of each head are permuted on export.
  Imports would need the token-type row folded into a tied embedding, which changes
  the logits: pretrained RoFormers do not import.

PyTorch's Linear stores [out, in]; our kernels are [in, out]: every projection is a
transpose.
"""

import dataclasses

import numpy as np

from tpu_lm.errors import UserError
from tpu_lm.interop.gpt2 import pad_rows
from tpu_lm.interop.llama import permute_rope

_LAYER = {  # ours -> theirs, under {prefix}encoder.layer.{i}.
    ("attn", "query"): "attention.self.query", ("attn", "key"): "attention.self.key",
    ("attn", "value"): "attention.self.value", ("attn", "out"): "attention.output.dense",
    ("mlp", "up"): "intermediate.dense", ("mlp", "down"): "output.dense",
}
_NORMS = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
_ACTIVATIONS = ("gelu", "gelu_python")  # transformers' names of the erf GELU


@dataclasses.dataclass(frozen=True)
class Family:
  ARCHITECTURE: str
  model_type: str
  prefix: str  # of the encoder's tensors: "bert.", "roberta.", or "" (BertModel's)
  head: dict  # the prediction head's tensors by our name, or {} (BertModel)
  type_rows: int  # the token-type table an export writes
  positions_from_pad: bool  # RoBERTa's numbering
  rotary: bool = False  # RoFormer's: positions rotate queries and keys, no table

  def model_fields(self, hf: dict) -> dict:
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
      raise UserError(f"{self.model_type} with hidden_act={act!r} is not supported: tpu_lm's BERT uses the exact"
                      " (erf) GELU, transformers' 'gelu'.")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise UserError(f"{self.model_type} with position_embedding_type={hf['position_embedding_type']!r} is not"
                      " supported: tpu_lm's BERT has absolute (learned) positions.")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
      raise UserError(f"a {self.model_type} configured as a decoder is not supported: import it as an encoder.")
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    return {
        "num_layers": hf["num_hidden_layers"], "d_model": d, "num_heads": heads, "num_kv_heads": 0, "head_dim": 0,
        "mlp_dim": hf["intermediate_size"], "max_len": hf["max_position_embeddings"] - self._offset(hf),
        "norm": "layernorm", "norm_eps": hf.get("layer_norm_eps", 1e-12), "position": "learned",
        "mlp": "gelu_exact", "use_bias": True, "norm_position": "post", "head_transform": True,
        "tie_embeddings": hf.get("tie_word_embeddings", True), "init_std": hf.get("initializer_range", 0.02),
    }

  def _offset(self, hf: dict) -> int:
    return int(hf.get("pad_token_id", 1)) + 1 if self.positions_from_pad else 0

  def hf_config(self, m, vocab_size: int, tokenizer, dtype: str) -> dict:
    offset = tokenizer.pad_id + 1 if self.positions_from_pad else 0
    rotary = {"embedding_size": m.d_model, "rotary_value": False} if self.rotary else {}
    return rotary | {
        "architectures": [self.ARCHITECTURE], "model_type": self.model_type, "vocab_size": vocab_size,
        "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "intermediate_size": m.mlp_dim, "hidden_act": "gelu", "max_position_embeddings": m.max_len + offset,
        "type_vocab_size": self.type_rows, "layer_norm_eps": m.norm_eps or 1e-5, "initializer_range": m.init_std,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        **({} if self.rotary else {"position_embedding_type": "absolute"}),
        "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "tie_word_embeddings": m.tie_embeddings, "is_decoder": False, "dtype": dtype,
    }

  def check_exportable(self, m) -> None:
    from tpu_lm.interop.gpt2 import require

    require(m, {"norm": "layernorm", "position": "rope" if self.rotary else "learned", "mlp": "gelu_exact",
                "use_bias": True, "norm_position": "post", "head_transform": True}, self.model_type,
            "configs/encoder.py (model.bert_block)")
    if self.rotary and (m.rope_theta != 10_000.0 or m.rope_scaling.type != "none"):
      raise UserError(f"model.rope_theta={m.rope_theta} with rope_scaling {m.rope_scaling.type!r}: RoFormer rotates"
                      " at theta 10000 without scaling; train with those to export.")
    if m.num_kv_heads and m.num_kv_heads != m.num_heads or m.head_dim and m.head_dim * m.num_heads != m.d_model:
      raise UserError("BERT has neither grouped-query attention nor a separate head_dim: train with"
                      " model.num_kv_heads=0 and model.head_dim=0 to export.")

  def to_params(self, t: dict, m: dict, vocab_padded: int) -> dict:
    """Hugging Face tensors -> our per-layer params (a BertModel's without the head)."""
    p = self.prefix
    e = p + "embeddings."
    positions = t[e + "position_embeddings.weight"]
    offset = positions.shape[0] - m["max_len"]  # RoBERTa's pad_id + 1 unread rows; BERT's 0
    types = t.get(e + "token_type_embeddings.weight")
    type0 = types[0] if types is not None else 0
    params = {
        "embed": {"embedding": pad_rows(t[e + "word_embeddings.weight"], vocab_padded)},
        "pos_embed": positions[offset:] + type0,
        "embed_norm": {"scale": t[e + "LayerNorm.weight"], "bias": t[e + "LayerNorm.bias"]},
    }
    for i in range(m["num_layers"]):
      q = f"{p}encoder.layer.{i}."
      layer = {"attn": {}, "mlp": {}}
      for (group, ours), theirs in _LAYER.items():
        layer[group][ours] = {"kernel": t[f"{q}{theirs}.weight"].T}
        if ours != "key":  # softmax cancels the key bias
          layer[group][ours]["bias"] = t[f"{q}{theirs}.bias"]
      for ours, theirs in _NORMS.items():
        layer[ours] = {"scale": t[f"{q}{theirs}.weight"], "bias": t[f"{q}{theirs}.bias"]}
      params[f"layers_{i}"] = layer
    if self.head:
      h = self.head
      params["head_dense"] = {"kernel": t[h["dense"] + ".weight"].T, "bias": t[h["dense"] + ".bias"]}
      params["head_norm"] = {"scale": t[h["norm"] + ".weight"], "bias": t[h["norm"] + ".bias"]}
      params["output_bias"] = pad_rows(t[h["bias"]], vocab_padded)
      if not m["tie_embeddings"]:
        params["unembed"] = {"kernel": pad_rows(t[h["decoder"] + ".weight"], vocab_padded).T}
    return params

  def from_params(self, params: dict, m, vocab_size: int, pad_id: int = 0) -> dict:
    """Our per-layer params -> this architecture's state dict (numpy)."""
    e = self.prefix + "embeddings."
    table = params["embed"]["embedding"]
    d = table.shape[1]
    out = {
        e + "word_embeddings.weight": table[:vocab_size],
        e + "token_type_embeddings.weight": np.zeros((self.type_rows, d), table.dtype),
        e + "LayerNorm.weight": params["embed_norm"]["scale"], e + "LayerNorm.bias": params["embed_norm"]["bias"],
    }
    head_dim = d // m.num_heads
    if self.rotary:
      out[self.prefix + "encoder.embed_positions.weight"] = _sinusoids(m.max_len, head_dim)
    else:
      offset = pad_id + 1 if self.positions_from_pad else 0
      out[e + "position_embeddings.weight"] = np.concatenate([np.zeros((offset, d), table.dtype), params["pos_embed"]])
    for i in range(m.num_layers):
      q, layer = f"{self.prefix}encoder.layer.{i}.", params[f"layers_{i}"]
      for (group, ours), theirs in _LAYER.items():
        w = layer[group][ours]
        weight = w["kernel"].T
        bias = w["bias"] if "bias" in w else np.zeros(weight.shape[0], weight.dtype)
        if self.rotary and ours in ("query", "key"):
          weight, bias = permute_rope(weight, m.num_heads), permute_rope(bias[:, None], m.num_heads)[:, 0]
        out[f"{q}{theirs}.weight"], out[f"{q}{theirs}.bias"] = weight, bias
      for ours, theirs in _NORMS.items():
        out[f"{q}{theirs}.weight"], out[f"{q}{theirs}.bias"] = layer[ours]["scale"], layer[ours]["bias"]
    h = self.head
    out[h["dense"] + ".weight"] = params["head_dense"]["kernel"].T
    out[h["dense"] + ".bias"] = params["head_dense"]["bias"]
    out[h["norm"] + ".weight"] = params["head_norm"]["scale"]
    out[h["norm"] + ".bias"] = params["head_norm"]["bias"]
    out[h["bias"]] = params["output_bias"][:vocab_size]
    if not m.tie_embeddings:
      out[h["decoder"] + ".weight"] = params["unembed"]["kernel"][:, :vocab_size].T
    return out


def _sinusoids(positions: int, head_dim: int) -> np.ndarray:
  """RoFormer's fixed table: sines of the H/2 angles, then their cosines (its create_weight)."""
  angles = np.arange(positions)[:, None] / np.power(10_000.0, 2 * np.arange(head_dim // 2) / head_dim)[None]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


_BERT_HEAD = {"dense": "cls.predictions.transform.dense", "norm": "cls.predictions.transform.LayerNorm",
              "bias": "cls.predictions.bias", "decoder": "cls.predictions.decoder"}
BERT = Family("BertForMaskedLM", "bert", "bert.", _BERT_HEAD, type_rows=2, positions_from_pad=False)
BERT_PRETRAINING = dataclasses.replace(BERT, ARCHITECTURE="BertForPreTraining")  # its next-sentence head unread
BERT_MODEL = Family("BertModel", "bert", "", {}, type_rows=2, positions_from_pad=False)
ROBERTA = Family("RobertaForMaskedLM", "roberta", "roberta.",
                 {"dense": "lm_head.dense", "norm": "lm_head.layer_norm", "bias": "lm_head.bias",
                  "decoder": "lm_head.decoder"}, type_rows=1, positions_from_pad=True)
ROFORMER = Family("RoFormerForMaskedLM", "roformer", "roformer.", _BERT_HEAD, type_rows=2, positions_from_pad=False,
                  rotary=True)
FAMILIES = (BERT, BERT_PRETRAINING, BERT_MODEL, ROBERTA)  # those that import


def normalize_names(tensors: dict, family: Family) -> dict:
  """Tensor names as transformers 5 writes them: the original BERT uploads name their
  LayerNorms' parameters gamma and beta; a BertModel saved inside a masked LM has
  `bert.` before its names."""
  out = {}
  for k, v in tensors.items():
    if "LayerNorm." in k or "layer_norm." in k:
      k = k.removesuffix(".gamma") + ".weight" if k.endswith(".gamma") else k
      k = k.removesuffix(".beta") + ".bias" if k.endswith(".beta") else k
    out[k] = v
  if family is BERT_MODEL and not any(k.startswith("embeddings.") for k in out):
    out = {k.removeprefix("bert."): v for k, v in out.items()}
  return out
