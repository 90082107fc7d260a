"""Tokenizers: SentencePiece (trained once on the training split and cached), bytes,
or a Hugging Face tokenizer.json (hf_tokenizer.py).

The first two are lossless (`decode(encode(text)) == text`), which bits-per-byte relies on.
Each tokenizer owns its special ids (`pad_id`, `bos_id`, `eos_id`): nothing else
in the project assumes their values, and a run directory records them. A
SentencePiece model is read back from its serialized protobuf; nothing here
unpickles.

A run directory also records how its prompts become ids (`prompt`, see
`encode_prompt`): the way its model saw every text begin.
"""

import copy
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import sentencepiece as spm

from tpu_lm import storage
from tpu_lm.errors import UserError

# The ids tpu_lm gives the special tokens of the tokenizers it makes; tokenizers
# made elsewhere bring their own.
_OWN_IDS = {"pad_id": 0, "bos_id": 1, "eos_id": 2}

# How a prompt (or a text to score) becomes ids. Training packs every document as
# [BOS] + tokens + [EOS], so a run trained here (fine-tuned ones included) is
# prompted with [BOS] + tokens; a model imported from Hugging Face learned its
# tokenizer's own convention, which `transformers` applies (hf_tokenizer.py).
PROMPT_BOS = "[BOS] + tokens"
PROMPT_OWN = "the tokenizer's own special tokens"


class Tokenizer(Protocol):
  vocab_size: int
  name: str
  pad_id: int
  bos_id: int
  eos_id: int
  prompt: str  # PROMPT_BOS, or what the run it was read from records
  sentinels: dict[str, int]  # an objective's special tokens past the vocabulary (`add_sentinels`), by name

  def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past the three special ids."""

  OFFSET = 3
  vocab_size = 256 + OFFSET
  name = "bytes"
  pad_id, bos_id, eos_id = _OWN_IDS["pad_id"], _OWN_IDS["bos_id"], _OWN_IDS["eos_id"]
  prompt = PROMPT_BOS
  sentinels: dict[str, int] = {}

  def encode_batch(self, texts):
    return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.uint16) + self.OFFSET for t in texts]

  def decode(self, ids):
    return bytes(int(i) - self.OFFSET for i in ids if self.OFFSET <= int(i) < 256 + self.OFFSET).decode(
        "utf-8", errors="replace"
    )


class SentencePieceTokenizer:
  """A SentencePiece BPE model, set up for source code and prose alike.

  Identity normalisation, no dummy prefix, kept whitespace and '\\n' as its own
  piece make it lossless; byte fallback covers any character unseen in training.
  """

  prompt = PROMPT_BOS
  sentinels: dict[str, int] = {}

  def __init__(self, model_proto: bytes, path: str = "<memory>"):
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(model_proto)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError here
      raise UserError(
          f"tokenizer file {path} is corrupt ({e}): delete it and it is retrained"
          " on the next run."
      ) from None
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise UserError(
          f"tokenizer file {path} has no beginning- or end-of-sequence token: train it with bos_id and"
          " eos_id set, or delete it and it is retrained on the next run."
      )
    # Padding is never a target (its weight is 0): a model without a pad piece pads with EOS.
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.vocab_size = self._sp.get_piece_size()
    # The hash ties cached tokenized splits to this exact model: a retrained
    # tokenizer never reads tokens made by another.
    self.name = f"spm{self.vocab_size}-{hashlib.sha256(model_proto).hexdigest()[:10]}"
    self.model_proto = model_proto

  def encode_batch(self, texts):
    return self._sp.encode(texts, num_threads=os.cpu_count() or 1)

  def decode(self, ids):
    pieces = self._sp.get_piece_size()  # sentinels past the model's pieces are not text
    return self._sp.decode([int(i) for i in ids if int(i) < pieces])


def _training_chunks(texts: Iterable[str], lines_per_chunk: int = 8) -> Iterator[str]:
  # SentencePiece learns from "sentences"; chunks of a few lines keep newlines and
  # indentation inside them, so pieces like "\n    " can be learned.
  for text in texts:
    lines = text.splitlines(keepends=True)
    for i in range(0, len(lines), lines_per_chunk):
      yield "".join(lines[i : i + lines_per_chunk])[:4000]


def train_sentencepiece(texts: Iterable[str], vocab_size: int) -> bytes:
  """Trains a BPE model on `texts`; returns its serialized protobuf."""
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_chunks(texts),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        **_OWN_IDS,
        unk_id=3,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=False,
        split_digits=True,
        user_defined_symbols=["\n"],
        # Every sentence given, in the order given: the caller's sample decides, so the
        # vocabulary is the same wherever it is trained.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=4096,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise UserError(
        f"could not train a SentencePiece vocabulary of {vocab_size} on this data ({e}):"
        " lower data.vocab_size or use data.tokenizer='bytes'."
    ) from None
  return out.getvalue()


def load_or_train(path: str, vocab_size: int, texts: Iterable[str]) -> SentencePieceTokenizer:
  """The cached tokenizer at `path`, training and writing it first if absent."""
  if storage.exists(path):
    with storage.open(path, "rb") as f:
      tok = SentencePieceTokenizer(f.read(), path)
    if tok.vocab_size != vocab_size:
      raise UserError(
          f"tokenizer file {path} has vocabulary {tok.vocab_size}, but data.vocab_size"
          f" is {vocab_size}: set data.vocab_size={tok.vocab_size} or delete the file."
      )
    return tok
  proto = train_sentencepiece(texts, vocab_size)
  storage.makedirs(os.path.dirname(path))
  storage.write_atomic(path, proto)  # a crash never leaves half a tokenizer
  return SentencePieceTokenizer(proto, path)


def load_sentencepiece(path: str, vocab_size: int) -> SentencePieceTokenizer:
  """A SentencePiece model file given by data.tokenizer_path."""
  try:
    with storage.open(path, "rb") as f:
      tok = SentencePieceTokenizer(f.read(), path)
  except OSError as e:
    raise UserError(f"cannot read data.tokenizer_path {path} ({e.strerror}): give a SentencePiece .model file.") from None
  if tok.vocab_size != vocab_size:
    raise UserError(f"{path} has vocabulary {tok.vocab_size}, but data.vocab_size is {vocab_size}: set"
                    f" data.vocab_size={tok.vocab_size}.")
  return tok


def load_hf(path: str):
  """The Hugging Face tokenizer in directory `path` (its tokenizer.json and special tokens)."""
  from tpu_lm.data.hf_tokenizer import HFTokenizer

  directory = os.path.expanduser(path)
  if not os.path.isdir(directory):
    raise UserError(f"data.tokenizer_path {path!r} is not a directory: give the directory that holds tokenizer.json.")
  return HFTokenizer(directory)


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max else np.int32


# A run directory keeps its own copy of the tokenizer, so generating from a run
# needs nothing but the run directory.
RUN_FILE = "tokenizer.json"
HF_DIR = "hf_tokenizer"  # a Hugging Face tokenizer's own files, copied as they are


def special_ids(tok: Tokenizer) -> dict[str, int]:
  return {"pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eos_id}


# The strings that stand for the special tokens of the tokenizers tpu_lm makes (bytes,
# SentencePiece), as their Hugging Face export names them; a Hugging Face tokenizer
# brings its own.
SPECIAL_NAMES = {"pad_id": "<|tpu_lm_pad|>", "bos_id": "<|tpu_lm_bos|>", "eos_id": "<|tpu_lm_eos|>"}


def add_sentinels(tok: Tokenizer, names: tuple[str, ...]) -> Tokenizer:
  """`tok` with `names` as special tokens of its own, ids past its vocabulary in that
  order (an objective's: fill-in-the-middle's prefix, suffix, middle, end). Encoding
  text never produces them, even a text holding their names; decoding drops them;
  `encode_text` (what a client of the server tokenizes) reads their names as them.
  The same tokenizer when it has them already."""
  if not names or tuple(tok.sentinels) == tuple(names):
    return tok
  if hasattr(tok, "token_text") and not tok.sentinels:
    return _own_sentinels(tok, names)
  if tok.sentinels or hasattr(tok, "token_text"):
    kind = "a Hugging Face tokenizer" if hasattr(tok, "token_text") else f"a tokenizer with {list(tok.sentinels)}"
    raise UserError(f"special tokens {list(names)} cannot be added to {kind}: train with data.tokenizer="
                    "'sentencepiece' or 'bytes'.")
  out = copy.copy(tok)
  out.sentinels = {name: tok.vocab_size + i for i, name in enumerate(names)}
  out.vocab_size = tok.vocab_size + len(names)
  # Another vocabulary: a run's name check and tokenized caches tell it from the plain one.
  out.name = f"{tok.name}+{len(names)}"
  return out


# The sentinels a Hugging Face tokenizer may hold already, by the attribute that holds its id.
_HF_SENTINELS = {"<mask>": "mask_id"}


def _own_sentinels(tok, names: tuple[str, ...]):
  """A Hugging Face tokenizer whose vocabulary has `names` already (BERT's [MASK] is the
  masked LM's <mask>): the same ids, the same vocabulary, sentinels named."""
  ids = {name: getattr(tok, _HF_SENTINELS[name], None) if name in _HF_SENTINELS else None for name in names}
  missing = [name for name, i in ids.items() if i is None]
  if missing:
    what = "mask token (mask_token in its tokenizer_config.json)" if missing == ["<mask>"] else f"token {missing}"
    raise UserError(f"the Hugging Face tokenizer {tok.name} has no {what}, which this objective needs: use a"
                    " tokenizer that has one, or data.tokenizer='sentencepiece' or 'bytes'.")
  out = copy.copy(tok)
  out.sentinels = ids
  return out


def byte_lengths(tok: Tokenizer) -> np.ndarray:
  """Per id, how many UTF-8 bytes of text it stands for (0 for special ids and
  sentinels): for our lossless tokenizers, a document's ids' lengths sum to its bytes,
  so their running sum places each token in the text. Hugging Face tokenizers are not
  covered (their normalisers may rewrite the text)."""
  out = np.zeros(tok.vocab_size, np.int64)
  plain = tok.vocab_size - len(tok.sentinels)
  if isinstance(tok, ByteTokenizer):
    out[tok.OFFSET:plain] = 1
  elif isinstance(tok, SentencePieceTokenizer):
    sp = tok._sp
    for i in range(plain):
      if sp.is_control(i) or sp.is_unknown(i):
        continue
      piece = sp.id_to_piece(i)
      out[i] = 1 if sp.is_byte(i) else len(piece.replace("\u2581", " ").encode("utf-8"))
  else:
    raise UserError(f"token offsets need a tokenizer tpu_lm makes (bytes or SentencePiece), not {tok.name}.")
  return out


def special_tokens(tok: Tokenizer) -> dict[str, str]:
  """{"pad_id": string, "bos_id": ..., "eos_id": ...}: the string of each special token
  (the end-of-sequence one's where padding is end-of-sequence)."""
  if hasattr(tok, "token_text"):  # a Hugging Face tokenizer
    return {key: tok.token_text(i) for key, i in special_ids(tok).items()}
  by_id = {getattr(tok, key): name for key, name in SPECIAL_NAMES.items()}  # pad may be eos: eos's name wins
  return {key: by_id[i] for key, i in special_ids(tok).items()}


def encode_text(tok: Tokenizer, text: str) -> list[int]:
  """`text`'s ids with no special token added, but a special token's string written in
  it (`special_tokens`) as its id, as Hugging Face tokenizers encode text. What a
  client that tokenizes for the server (`POST /tokenize`) gets; training encodes
  documents with `encode_batch`, where such strings stay text."""
  if hasattr(tok, "token_text"):  # Hugging Face tokenizers split out their special tokens themselves
    return [int(t) for t in tok.encode_batch([text])[0]]
  ids = {name: getattr(tok, key) for key, name in SPECIAL_NAMES.items()} | tok.sentinels
  parts = re.split("(" + "|".join(map(re.escape, ids)) + ")", text)  # text, special, text, ...
  pieces = iter(tok.encode_batch(parts[::2]))
  out = []
  for i, part in enumerate(parts):
    out.extend([ids[part]] if i % 2 else (int(t) for t in next(pieces)))
  return out


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
  """`text` as the run's model saw texts begin: [BOS] + its ids (tok.prompt ==
  PROMPT_BOS), or as the Hugging Face tokenizer itself encodes it (PROMPT_OWN). A
  special token's string in it is that token (`encode_text`)."""
  if tok.prompt == PROMPT_OWN:
    return tok.encode_with_special_tokens(text)
  return [tok.bos_id, *encode_text(tok, text)]


def save_for_run(tok: Tokenizer, workdir: str, prompt: str = PROMPT_BOS) -> None:
  """Writes `tok` into the run directory, with `prompt`: how the run is prompted
  (training writes the default; the Hugging Face importer PROMPT_OWN)."""
  if prompt not in (PROMPT_BOS, PROMPT_OWN) or (prompt == PROMPT_OWN and not hasattr(tok, "files")):
    raise ValueError(f"prompt={prompt!r} for a {type(tok).__name__}")
  meta = {"type": "bytes"}
  if isinstance(tok, SentencePieceTokenizer):
    meta = {"type": "sentencepiece", "file": "tokenizer.model", "name": tok.name}
    storage.write_atomic(os.path.join(workdir, "tokenizer.model"), tok.model_proto)
  elif hasattr(tok, "files"):  # a Hugging Face tokenizer
    meta = {"type": "hf", "dir": HF_DIR, "name": tok.name}
    storage.makedirs(os.path.join(workdir, HF_DIR))
    for name, data in tok.files().items():
      storage.write_atomic(os.path.join(workdir, HF_DIR, name), data)
  meta["special_ids"] = special_ids(tok)  # for readers of the run directory other than tpu_lm
  meta["prompt"] = prompt
  if tok.sentinels:
    meta["sentinels"] = tok.sentinels
  storage.write_atomic(os.path.join(workdir, RUN_FILE), json.dumps(meta, indent=1).encode())


def load_for_run(workdir: str) -> Tokenizer:
  path = os.path.join(workdir, RUN_FILE)
  try:
    with storage.open(path) as f:
      meta = json.load(f)
    if meta["type"] == "bytes":
      tok = ByteTokenizer()
    elif meta["type"] == "hf":
      from tpu_lm.data.hf_tokenizer import HFTokenizer

      tok = HFTokenizer(os.path.join(workdir, meta["dir"]), meta["special_ids"])
    else:
      model_path = os.path.join(workdir, meta["file"])
      with storage.open(model_path, "rb") as f:
        tok = SentencePieceTokenizer(f.read(), model_path)
    saved = meta.get("special_ids", special_ids(tok))
    if saved != special_ids(tok):
      raise ValueError(f"special ids {saved} differ from the tokenizer's {special_ids(tok)}")
    # Run directories written before the key were all prompted with [BOS] + tokens.
    tok.prompt = meta.get("prompt", PROMPT_BOS)
    if meta.get("sentinels"):
      names = tuple(meta["sentinels"])
      tok = add_sentinels(tok, names)
      if tok.sentinels != meta["sentinels"]:
        raise ValueError(f"sentinels {meta['sentinels']} are not the ids past the vocabulary")
    if tok.prompt not in (PROMPT_BOS, PROMPT_OWN) or (tok.prompt == PROMPT_OWN and meta["type"] != "hf"):
      raise ValueError(f"prompt {tok.prompt!r} for a {meta['type']} tokenizer")
    return tok
  except FileNotFoundError as e:
    raise UserError(
        f"{e.filename} is missing: {workdir} is not a tpu_lm run directory, or it was trained"
        " before runs kept their tokenizer (rerun python -m tpu_lm.main on it to write one)."
    ) from None
  except (ValueError, KeyError, TypeError):
    raise UserError(f"{path} is corrupt: rerun python -m tpu_lm.main on {workdir} to rewrite it.") from None


class TextStream:
  """Token ids in, new text out: detokenizes a growing sequence for streaming.

  Holds text back while it ends in an incomplete UTF-8 sequence (a byte-level
  piece), so a stream never shows a replacement character that later resolves.
  """

  def __init__(self, tok: Tokenizer):
    self._tok, self._ids, self._sent = tok, [], ""

  def push(self, token: int) -> str:
    self._ids.append(int(token))
    text = self._tok.decode(self._ids)
    if text.endswith("\ufffd") or not text.startswith(self._sent):
      return ""
    delta, self._sent = text[len(self._sent):], text
    return delta

  @property
  def num_tokens(self) -> int:
    return len(self._ids)

  def finish(self) -> str:
    text = self._tok.decode(self._ids)
    delta = text[len(self._sent):] if text.startswith(self._sent) else ""
    self._sent = text
    return delta
