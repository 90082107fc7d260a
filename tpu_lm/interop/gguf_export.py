"""A Llama-shape run as one GGUF file, the format llama.cpp and Ollama load.

`export(workdir, path, gguf_type)` writes the run's parameters, hyperparameters and
tokenizer with the `gguf` package's writer, named and laid out as llama.cpp's own
converter (convert_hf_to_gguf.py) writes a LlamaForCausalLM:

- Tensors: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
  ffn_gate, ffn_up, ffn_down}, output_norm and output (absent when the embedding is
  tied: llama.cpp then unembeds with token_embd), each in PyTorch's [out, in] layout
  (GGUF lists dimensions the other way round). Query and key rows are permuted within
  each head: our RoPE pairs dimension i with i + D/2 (rotate-half, as Hugging Face's
  Llama), llama.cpp's pairs 2i with 2i + 1; permuting q and k alike leaves every
  attention score as it was. Llama 3 RoPE scaling is llama.cpp's `rope_freqs` tensor
  (each frequency's divisor).
- Types: f32 is exact; f16 stores matrices in float16; q8_0 stores matrices in Q8_0
  (blocks of 32 int8 values with a float16 scale) where a row is a multiple of 32 long,
  float16 otherwise. Norms stay float32. These are llama.cpp's converter's choices.
- The vocabulary is the tokenizer's ids (sentinels included). The rows the model's
  table adds for sharding are dropped, as --to_hf drops them: tpu_lm masks their
  logits, llama.cpp would not.
- Tokenizers: tpu_lm's own two, as llama.cpp's SentencePiece kind ("llama"), which
  writes each space as "▁", splits text into characters, merges neighbours into the
  highest-scoring piece their text makes and falls back to <0xNN> byte pieces. A
  SentencePiece model keeps its pieces, scores and types. The byte tokenizer becomes
  its 256 byte pieces with no merges, the space's piece written "▁" (llama.cpp never
  looks up a bare space); both give tpu_lm's ids, except that a "▁" (U+2581) in the
  text reads as a space. Special tokens take the names tpu_lm's server reads
  (<|tpu_lm_bos|> ...; SentencePiece's <s> is text in source code). A Hugging Face
  tokenizer (an imported run) is refused: llama.cpp knows a byte-level BPE's
  pre-tokenizer by a hash its converter takes of the tokenizer's output, so that run
  goes through --to_hf and llama.cpp's convert_hf_to_gguf.py.
"""

import os

import gguf
import numpy as np

from tpu_lm.config import derived
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.interop import hf, llama

TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_QT = gguf.GGMLQuantizationType
_TT = gguf.TokenType
# Hugging Face's names (llama.from_params) -> llama.cpp's.
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def export(workdir: str, path: str, gguf_type: str = "f16", step: int | None = None) -> str:
  """Writes the run's newest (or `step`'s) checkpoint to `path`; returns a one-line summary."""
  if gguf_type not in TYPES:
    raise UserError(f"--gguf_type={gguf_type} is not a GGUF type tpu_lm writes: use one of {', '.join(TYPES)}.")
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path):
    raise UserError(f"{path} exists: pass a new --to_gguf file (nothing was overwritten).")
  workdir, step, config = hf.read_export_config(workdir, step, to="GGUF")
  m = config.model
  if m.position == "learned":
    raise UserError(f"{workdir} is a GPT-2-shape run (learned positions, LayerNorm, GELU): --to_gguf writes"
                    " Llama-shape runs (RoPE, RMSNorm, SwiGLU); export this one with --to_hf.")
  llama.check_exportable(m)
  tokenizer = tokenizer_lib.load_for_run(workdir)
  vocab = vocabulary(tokenizer)  # a tokenizer GGUF cannot hold is refused before the weights are read
  params = hf.read_export_params(workdir, step, config)
  tensors = llama_cpp_tensors(llama.from_params(params, m, derived.tokenizer_vocab_size(config)), m)
  if tensors["token_embd.weight"].shape[0] != len(vocab["tokens"]):
    raise ValueError(f"{len(vocab['tokens'])} tokens for {tensors['token_embd.weight'].shape[0]} embedding rows")
  tmp = f"{path}.tmp{os.getpid()}"  # renamed when whole: a failure leaves no half-written file
  writer = gguf.GGUFWriter(tmp, "llama")
  writer.add_name(os.path.basename(workdir.rstrip("/")))
  _add_hyperparameters(writer, m, len(vocab["tokens"]), TYPES[gguf_type])
  _add_vocabulary(writer, vocab)
  for name, x in tensors.items():
    data, qtype = encode(x, gguf_type)
    writer.add_tensor(name, data, raw_dtype=qtype)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
  except OSError as e:
    raise UserError(f"cannot write {path} ({e.strerror}): pass a writable --to_gguf path.") from None
  finally:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
  size = os.path.getsize(path) / 2**20
  vision = " (the decoder alone: the vision encoder is not written; --to_hf saves it)" if config.vision.image_height \
      else ""
  return (f"wrote {path}: GGUF {gguf_type}, {size:,.1f} MiB, {len(tensors)} tensors (llama, {m.num_layers} layers,"
          f" width {m.d_model}, {len(vocab['tokens'])} tokens) from {workdir} step {step}{vision}")


def llama_cpp_tensors(hf_tensors: dict, m) -> dict:
  """Hugging Face Llama tensors (llama.from_params) under llama.cpp's names, q and k
  permuted for its RoPE, plus `rope_freqs` for Llama 3 scaling; float32."""
  out = {}
  for name, x in hf_tensors.items():
    base = name.removesuffix(".weight")
    if base in TOP_NAMES:
      out[TOP_NAMES[base] + ".weight"] = x
      continue
    _, _, i, sub = base.split(".", 3)  # model.layers.{i}.{sub}
    if sub == "self_attn.q_proj":
      x = llama.permute_rope(x, m.num_heads)
    elif sub == "self_attn.k_proj":
      x = llama.permute_rope(x, m.num_kv_heads or m.num_heads)
    out[f"blk.{i}.{LAYER_NAMES[sub]}.weight"] = x
  if m.rope_scaling.type == "llama3":
    out["rope_freqs.weight"] = _rope_divisors(m)
  return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _rope_divisors(m) -> np.ndarray:
  """What each RoPE frequency is divided by under Llama 3 scaling, from tpu_lm's own
  frequencies (layers.rope_frequencies), so llama.cpp rotates by exactly those."""
  from tpu_lm.model import layers

  head_dim = m.head_dim or m.d_model // m.num_heads
  plain = np.asarray(layers.rope_frequencies(head_dim, m.rope_theta))
  return plain / np.asarray(layers.rope_frequencies(head_dim, m.rope_theta, derived.rope_scaling(m)))


def encode(x: np.ndarray, gguf_type: str) -> tuple[np.ndarray, "gguf.GGMLQuantizationType"]:
  """(data, GGML type) of one tensor in a file of `gguf_type`: vectors (norms, rope_freqs)
  float32; matrices per the type, Q8_0 only where its 32-value blocks tile a row."""
  if x.ndim == 1 or gguf_type == "f32":
    return x.astype(np.float32), _QT.F32
  if gguf_type == "q8_0" and x.shape[-1] % 32 == 0:
    return gguf.quants.quantize(x, _QT.Q8_0), _QT.Q8_0
  return x.astype(np.float16), _QT.F16


def _add_hyperparameters(writer, m, vocab_size: int, file_type) -> None:
  from tpu_lm.model import layers

  head_dim = m.head_dim or m.d_model // m.num_heads
  writer.add_context_length(m.max_len)
  writer.add_embedding_length(m.d_model)
  writer.add_block_count(m.num_layers)
  writer.add_feed_forward_length(m.mlp_dim)
  writer.add_head_count(m.num_heads)
  writer.add_head_count_kv(m.num_kv_heads or m.num_heads)
  writer.add_key_length(head_dim)  # llama.cpp's default, d_model / heads, is wrong for an explicit head_dim
  writer.add_value_length(head_dim)
  writer.add_layer_norm_rms_eps(m.norm_eps or layers.DEFAULT_EPS["rmsnorm"])
  writer.add_rope_freq_base(m.rope_theta)
  writer.add_rope_dimension_count(head_dim)
  writer.add_vocab_size(vocab_size)
  writer.add_file_type(file_type)
  if file_type == gguf.LlamaFileType.MOSTLY_Q8_0:
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def vocabulary(tok) -> dict:
  """The run's tokenizer as llama.cpp's SentencePiece vocabulary: {"tokens", "scores",
  "types", "special": {"bos", "eos", "padding", "unknown"}} (see the module docstring)."""
  names = {getattr(tok, key): name for key, name in tokenizer_lib.SPECIAL_NAMES.items()}  # pad may be eos
  if isinstance(tok, tokenizer_lib.ByteTokenizer):
    tokens = [names[i] for i in range(tok.OFFSET)] + [f"<0x{b:02X}>" for b in range(256)]
    types = [_TT.CONTROL] * tok.OFFSET + [_TT.BYTE] * 256
    space = tok.OFFSET + ord(" ")
    tokens[space], types[space] = "▁", _TT.NORMAL
    scores = [0.0] * len(tokens)
    unknown = None
  elif isinstance(tok, tokenizer_lib.SentencePieceTokenizer):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok.model_proto)
    tokens = [names.get(i, p.piece) for i, p in enumerate(proto.pieces)]
    scores = [p.score for p in proto.pieces]
    types = [_TT(p.type) for p in proto.pieces]  # SentencePiece's piece types are GGUF's token types
    unknown = next((i for i, p in enumerate(proto.pieces) if p.type == pb.ModelProto.SentencePiece.UNKNOWN), None)
  else:
    raise UserError(f"the run's tokenizer is Hugging Face's ({tok.name}), which GGUF export does not rebuild:"
                    " export with --to_hf and convert that with llama.cpp's convert_hf_to_gguf.py.")
  for name, i in tok.sentinels.items():  # an objective's special tokens, past the vocabulary in id order
    if i != len(tokens):
      raise ValueError(f"sentinel {name} has id {i}, not the next one, {len(tokens)}")
    tokens.append(name)
    scores.append(0.0)
    types.append(_TT.CONTROL)
  special = {"bos": tok.bos_id, "eos": tok.eos_id, "padding": tok.pad_id, "unknown": unknown}
  return {"tokens": tokens, "scores": scores, "types": types, "special": special}


def _add_vocabulary(writer, vocab: dict) -> None:
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(vocab["tokens"])
  writer.add_token_scores(vocab["scores"])
  writer.add_token_types(vocab["types"])
  s = vocab["special"]
  writer.add_bos_token_id(s["bos"])
  writer.add_eos_token_id(s["eos"])
  writer.add_pad_token_id(s["padding"])
  if s["unknown"] is not None:
    writer.add_unk_token_id(s["unknown"])
  # Prompts are [BOS] + tokens, as every training document began; no space goes in front.
  writer.add_add_bos_token(True)
  writer.add_add_eos_token(False)
  writer.add_add_space_prefix(False)
