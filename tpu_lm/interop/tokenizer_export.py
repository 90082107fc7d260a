"""A run's tokenizer as Hugging Face tokenizer files (`tokenizer.json` +
`tokenizer_config.json`, and a SentencePiece run's own `tokenizer.model`) that
`AutoTokenizer.from_pretrained` loads and other consumers of Hugging Face
checkpoints read.

A Hugging Face tokenizer is copied as it came. tpu_lm's own are rebuilt with the
`tokenizers` library so that they give the same ids:

- bytes: a byte-fallback BPE with no merges, whose vocabulary is tpu_lm's (the three
  special tokens, then <0x00> .. <0xFF>);
- SentencePiece (BPE, identity normalisation, no dummy prefix, byte fallback, "\\n"
  its own piece): the pieces as vocabulary, the merges recovered from them and
  ranked by the merged piece's score (what SentencePiece's encoder follows), spaces
  as "▁".

Both prepend [BOS] when encoding (the post-processor), as tpu_lm's prompts do, and an
encoder's ([BOS] + text + [EOS], as it read every document) appends [EOS]. An
objective's sentinels (fill in the middle: `<|fim_prefix|>` ...) are special tokens at
their run's ids, so the exported model infills in transformers from the same text (and
the masked LM's `<mask>` is the tokenizer's mask_token, which fill-mask reads). The
special tokens are named `<|tpu_lm_bos|>` and so on rather than SentencePiece's
`<s>`: Hugging Face tokenizers match a special token's text wherever it appears in
the input, and source code does contain `<s>` (tpu_lm encodes it as characters).

Consumers that read more than tokenizer.json:
- `tokenizer.model`, a SentencePiece run's own model copied byte for byte: llama.cpp's
  converter and the `sentencepiece` library tokenize with its pieces, scores and piece
  types (from tokenizer.json alone, llama.cpp gives every piece the same score).
- `add_prefix_space: false`: neither tokenizer puts a space before the text, while
  llama.cpp's converter (it reads this key for Llama models) and transformers'
  LlamaTokenizer add one unless told.
- No `legacy` key: transformers 5 reads it only where add_prefix_space is true;
  transformers 4's slow LlamaTokenizer with legacy=false would encode "<unk>" + text
  and drop the "<unk>" pieces for a text starting with a space (a workaround for
  SentencePiece models that strip leading whitespace, which ours keeps), with its
  default it encodes with the model as it is.
"""

import json
import os

from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.tasks.mlm import MASK

_SPECIAL = tokenizer_lib.SPECIAL_NAMES  # the names the server reads in text (tokenizer.encode_text)


def write(tok, directory: str, max_len: int | None = None, encoder: bool = False) -> None:
  """`encoder`: the run reads [BOS] + text + [EOS] (a masked LM's), not a prompt."""
  if hasattr(tok, "files"):  # already a Hugging Face tokenizer
    for name, data in tok.files().items():
      if name == "tokenizer.json":
        data = _prompted_as_trained(tok, data, encoder)
      with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
    return
  hf_tok = build(tok, encoder)
  hf_tok.save(os.path.join(directory, "tokenizer.json"))
  if isinstance(tok, tokenizer_lib.SentencePieceTokenizer):
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
      f.write(tok.model_proto)
  names = {k: hf_tok.id_to_token(getattr(tok, k)) for k in _SPECIAL}
  meta = {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names["bos_id"], "eos_token": names["eos_id"],
      "pad_token": names["pad_id"], "clean_up_tokenization_spaces": False, "add_bos_token": True,
      "add_prefix_space": False,
  }
  if tok.sentinels:  # transformers keeps them whole and drops them when decoding with skip_special_tokens
    meta["additional_special_tokens"] = list(tok.sentinels)
  if MASK in tok.sentinels:
    meta["mask_token"] = MASK
  if max_len:
    meta["model_max_length"] = max_len
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(meta, f, indent=2)


def _prompted_as_trained(tok, tokenizer_json: bytes, encoder: bool = False) -> bytes:
  """A Hugging Face tokenizer.json that encodes texts as the run's model saw them: as it
  came for an imported run; for one trained here ([BOS] + tokens: every document was
  packed so, and an encoder's + [EOS]) with a post-processor that adds them, if it lacks one."""
  if getattr(tok, "prompt", tokenizer_lib.PROMPT_BOS) != tokenizer_lib.PROMPT_BOS:
    return tokenizer_json
  probe = "def f(x):\n    return x"
  want = tokenizer_lib.encode_prompt(tok, probe) + ([tok.eos_id] if encoder else [])
  if tok.encode_with_special_tokens(probe) == want:
    return tokenizer_json
  from tokenizers import Tokenizer

  hf_tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
  hf_tok.post_processor = _post_processor(hf_tok, tok, encoder)
  return hf_tok.to_str().encode("utf-8")


def _post_processor(hf_tok, tok, encoder: bool):
  """[BOS] $A, or an encoder's [BOS] $A [EOS] (a pair: each text so)."""
  from tokenizers import processors

  bos, eos = hf_tok.id_to_token(tok.bos_id), hf_tok.id_to_token(tok.eos_id)
  if encoder:
    return processors.TemplateProcessing(single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
                                         special_tokens=[(bos, tok.bos_id), (eos, tok.eos_id)])
  return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                       special_tokens=[(bos, tok.bos_id)])


def build(tok, encoder: bool = False):
  """The equivalent `tokenizers.Tokenizer` of a bytes or SentencePiece tokenizer."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

  specials = {getattr(tok, key): name for key, name in _SPECIAL.items()}  # id -> name (pad may be eos)
  if isinstance(tok, tokenizer_lib.ByteTokenizer):
    vocab = {name: i for i, name in specials.items()}
    vocab.update({f"<0x{b:02X}>": b + tok.OFFSET for b in range(256)})
    hf_tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf_tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
  else:
    vocab, merges, user = _sentencepiece_tables(tok, specials)
    hf_tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>",
                                  fuse_unk=True))
    hf_tok.normalizer = normalizers.Replace(" ", "▁")
    hf_tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf_tok.add_tokens([AddedToken(u, normalized=False, special=False) for u in user])
  hf_tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials.values()])
  # An objective's sentinels (fill in the middle's) follow the vocabulary, in id order, as in the run.
  hf_tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in tok.sentinels])
  if any(hf_tok.token_to_id(name) != i for name, i in tok.sentinels.items()):
    raise ValueError(f"the sentinels {tok.sentinels} did not keep their ids in the exported tokenizer")
  hf_tok.post_processor = _post_processor(hf_tok, tok, encoder)
  return hf_tok


def _sentencepiece_tables(tok, specials: dict):
  """(vocab, ranked merges, user-defined pieces) of a SentencePiece BPE model; the
  pieces with ids in `specials` take those names."""
  from sentencepiece import sentencepiece_model_pb2 as pb

  proto = pb.ModelProto()
  proto.ParseFromString(tok.model_proto)
  normal, user = pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED
  vocab = {specials.get(i, p.piece): i for i, p in enumerate(proto.pieces)}
  scores = {p.piece: p.score for p in proto.pieces if p.type == normal}
  merges = []
  for piece, score in scores.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in scores and right in scores:
        merges.append((score, vocab[piece], vocab[left], left, right))
  # Highest score first; ties as SentencePiece breaks them (the earlier piece).
  merges.sort(key=lambda m: (-m[0], m[1], m[2]))
  users = [p.piece for p in proto.pieces if p.type == user]
  return vocab, [(left, right) for *_, left, right in merges], users
