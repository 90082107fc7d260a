"""From `data.dataset` to tokenized splits: build (once), tokenize (once), cache.

`python_stdlib`, `text_files`, `instructions` and `stdlib_functions` are the
project's own offline TFDS builders; any other name is looked up in the TFDS
catalog (which downloads, so it needs a network the first time). A split is
tokenized as text (packed documents), as prompt/completion pairs (packed, with
a loss mask over completions) or as labelled examples (classification). The tokenizer and each tokenized split are cached in a
`tpu_lm/` folder inside the dataset's TFDS directory, and recorded in
`data_dir/tpu_lm_warm/`, so later runs read it in a second without TFDS.
"""

import dataclasses
import hashlib
import json
import logging
import os
import sys
import zlib
from collections.abc import Iterator

from tpu_lm.data import examples, local_files, packing
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError

OWN_BUILDERS = ("python_stdlib", "text_files", "instructions", "stdlib_functions")
_CACHE_FORMAT = 2  # bump when the tokenized-split layout changes


@dataclasses.dataclass(frozen=True)
class Corpus:
  tokenizer: tokenizer_lib.Tokenizer
  train: packing.TokenStream | examples.ExampleSet
  validation: packing.TokenStream | examples.ExampleSet
  zlib_bits_per_byte: float  # `zlib -9` on the validation text, as a reference (0: not text)
  cache_dir: str
  class_names: tuple = ()  # classification: the label feature's names


def kind(data, task_kind: str = "lm") -> str:
  """How a split is tokenized: "text", "instructions" or "classification"."""
  if task_kind == "classification":
    return "classification"
  return "instructions" if data.dataset == "instructions" else "text"


def _builder(data):
  """The TFDS builder for `data.dataset`, prepared (built or downloaded) on disk."""
  from tpu_lm.data import builders  # imports TFDS: seconds, so only when needed
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  logging.getLogger("absl").setLevel(logging.ERROR)  # e.g. "Using custom data configuration"
  data_dir = os.path.expanduser(data.data_dir)
  if data.dataset == "python_stdlib":
    b = builders.PythonStdlib(data_dir=data_dir)
  elif data.dataset == "text_files":
    b = builders.TextFiles(path=data.path, data_dir=data_dir)
  elif data.dataset == "instructions":
    b = builders.Instructions(path=data.path, data_dir=data_dir)
  elif data.dataset == "stdlib_functions":
    b = builders.StdlibFunctions(data_dir=data_dir)
  else:
    try:
      b = tfds.builder(data.dataset, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(
          f"data.dataset {data.dataset!r} is neither one of {OWN_BUILDERS} nor a"
          " TFDS catalog dataset: check the name (e.g. 'tiny_shakespeare', 'lm1b')."
      ) from None
  try:
    b.download_and_prepare(file_format="array_record")
  except PermissionError as e:
    raise UserError(
        f"cannot write the dataset to {data_dir} ({e.strerror}): set data.data_dir to a"
        " writable directory."
    ) from None
  except OSError as e:
    if data.dataset in OWN_BUILDERS:
      raise
    raise UserError(
        f"could not download TFDS dataset {data.dataset!r} ({e}): this needs a"
        " network connection the first time."
    ) from None
  for split in (data.train_split, data.eval_split):
    if split not in b.info.splits:
      raise UserError(
          f"dataset {data.dataset!r} has no split {split!r}: use one of"
          f" {sorted(b.info.splits)} for data.train_split / data.eval_split."
      )
  return b


def _texts(source, text_key: str, limit: int) -> Iterator[str]:
  n = len(source) if limit <= 0 else min(limit, len(source))
  for i in range(n):
    value = source[i][text_key]
    yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_features(source, data, split_kind: str) -> None:
  if len(source) == 0:
    raise UserError(f"split {data.train_split!r} of {data.dataset!r} is empty: choose another split.")
  keys = set(source[0])
  for field, key in (("data.text_key", data.text_key), ("data.label_key", data.label_key)):
    if field == "data.label_key" and split_kind != "classification" or split_kind == "instructions":
      continue
    if key not in keys:
      raise UserError(f"dataset {data.dataset!r} has no feature {key!r}: set {field} to one of {sorted(keys)}.")


def _encode(tok, texts: list[str]) -> list:
  ids = []
  for i in range(0, len(texts), 512):
    ids.extend(tok.encode_batch(texts[i : i + 512]))
  return ids


def _tokenized(source, data, tok, directory: str, split_kind: str):
  """The split as a TokenStream (or ExampleSet), read from the cache or tokenized and cached."""
  if os.path.exists(os.path.join(directory, "meta.json")):
    return examples.load(directory) if split_kind == "classification" else packing.load(directory)
  n = len(source) if data.max_documents <= 0 else min(data.max_documents, len(source))
  dtype = tokenizer_lib.token_dtype(tok.vocab_size)
  meta = {"format": _CACHE_FORMAT, "num_docs": n, "zlib_bits_per_byte": 0.0}
  if split_kind == "instructions":
    records = [source[i] for i in range(n)]
    prompts, completions = ([_str(r[k]) for r in records] for k in ("prompt", "completion"))
    prompt_ids, completion_ids = _encode(tok, prompts), _encode(tok, completions)
    # Bits per byte over what the loss covers: the completions.
    num_bytes = sum(len(c.encode("utf-8")) for c in completions)
    stream = packing.from_documents(
        [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)], num_bytes, tok.bos_id, tok.eos_id, dtype,
        prompt_lengths=[len(p) for p in prompt_ids])
    packing.save(stream, directory, meta)
    return stream, meta
  if split_kind == "classification":
    records = [source[i] for i in range(n)]
    texts = [_str(r[data.text_key]) for r in records]
    labels = [int(r[data.label_key]) for r in records]
    ex = examples.from_examples(_encode(tok, texts), labels, tok.bos_id, tok.eos_id, dtype,
                                sum(len(t.encode("utf-8")) for t in texts))
    examples.save(ex, directory, meta)
    return ex, meta
  texts = list(_texts(source, data.text_key, data.max_documents))
  raw = [t.encode("utf-8") for t in texts]
  stream = packing.from_documents(_encode(tok, texts), sum(map(len, raw)), tok.bos_id, tok.eos_id, dtype)
  all_bytes = b"\n".join(raw)
  meta["zlib_bits_per_byte"] = 8 * len(zlib.compress(all_bytes, 9)) / max(len(all_bytes), 1)
  packing.save(stream, directory, meta)
  return stream, meta


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tokenizer_texts(source, data):
  """What a SentencePiece vocabulary is trained on: the split's text (or pairs)."""
  if data.dataset != "instructions":
    yield from _texts(source, data.text_key, data.max_documents)
    return
  n = len(source) if data.max_documents <= 0 else min(data.max_documents, len(source))
  for i in range(n):
    yield _str(source[i]["prompt"]) + _str(source[i]["completion"])


def prepare(data, tokenizer: tokenizer_lib.Tokenizer | None = None, task_kind: str = "lm") -> Corpus:
  """Builds or loads everything the run reads: tokenizer and both splits.

  `tokenizer` (a run's own, for fine-tuning) replaces the one data.tokenizer names.
  A warm start (tokenizer and both tokenized splits cached for exactly this data
  config and these files) reads the cache alone, without importing TensorFlow.
  """
  split_kind = kind(data, task_kind)
  index = _warm_index_path(data, tokenizer, split_kind)
  warm = _load_warm(index, data, tokenizer, split_kind)
  if warm is not None:
    return warm
  b = _builder(data)
  cache_dir = os.path.join(b.data_dir, "tpu_lm")
  train_src = b.as_data_source(split=data.train_split)
  eval_src = b.as_data_source(split=data.eval_split)
  _check_features(train_src, data, split_kind)
  tok_file = None
  if tokenizer is not None:
    tok = tokenizer
  elif data.tokenizer == "bytes":
    tok = tokenizer_lib.ByteTokenizer()
  elif data.tokenizer == "hf":
    tok = tokenizer_lib.load_hf(data.tokenizer_path)
  elif data.tokenizer_path:  # a SentencePiece model made elsewhere (another run's, say)
    tok_file = os.path.abspath(os.path.expanduser(data.tokenizer_path))
    tok = tokenizer_lib.load_sentencepiece(tok_file, data.vocab_size)
  else:
    tok_file = os.path.join(cache_dir, f"spm{data.vocab_size}.model")
    tok = tokenizer_lib.load_or_train(tok_file, data.vocab_size, _tokenizer_texts(train_src, data))
  class_names = ()
  if split_kind == "classification":
    feature = b.info.features[data.label_key]
    if not hasattr(feature, "num_classes"):
      raise UserError(f"feature {data.label_key!r} of {data.dataset!r} is not a class label: set data.label_key.")
    class_names = tuple(feature.names)
  suffix = f"-max{data.max_documents}" if data.max_documents > 0 else ""
  dirs = {split: os.path.join(cache_dir, f"{tok.name}-{split_kind}-{split}{suffix}")
          for split in (data.train_split, data.eval_split)}
  train, _ = _tokenized(train_src, data, tok, dirs[data.train_split], split_kind)
  validation, meta = _tokenized(eval_src, data, tok, dirs[data.eval_split], split_kind)
  _write_json_atomic(index, {"tokenizer_file": tok_file, "train": dirs[data.train_split],
                             "validation": dirs[data.eval_split], "cache_dir": cache_dir,
                             "class_names": list(class_names)})
  return Corpus(tok, train, validation, meta["zlib_bits_per_byte"], cache_dir, class_names)


def _warm_index_path(data, tokenizer, split_kind: str) -> str:
  """Where the cache of this exact data config is recorded: keyed by every field that
  changes the tokens, and for local corpora by a fingerprint of their files."""
  if data.dataset in ("python_stdlib", "stdlib_functions"):
    # The standard library changes only with the interpreter: its version names it
    # (walking its 1,800 files would cost most of a warm start).
    source = [data.dataset, sys.version, sys.prefix]
  elif data.dataset in ("text_files", "instructions"):
    source = [data.dataset, local_files.fingerprint(*local_files.user_files(data.path))]
  else:
    source = ["tfds", data.dataset]  # a prepared catalog dataset does not change
  if tokenizer is not None:
    tok = ["given", tokenizer.name]
  elif data.tokenizer_path:
    tok = [data.tokenizer, os.path.abspath(os.path.expanduser(data.tokenizer_path)), _mtime(data.tokenizer_path)]
  else:
    tok = [data.tokenizer, data.vocab_size if data.tokenizer != "bytes" else 0]
  key = json.dumps([_CACHE_FORMAT, source, data.train_split, data.eval_split, data.text_key, split_kind,
                    data.label_key if split_kind == "classification" else "", data.max_documents, tok])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(os.path.expanduser(data.data_dir), "tpu_lm_warm", f"{digest}.json")


def _mtime(path: str) -> int:
  path = os.path.expanduser(path)
  try:
    return os.stat(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path).st_mtime_ns
  except OSError:
    return 0


def _load_warm(index: str, data, tokenizer, split_kind: str) -> Corpus | None:
  """The corpus from a complete cache, or None (then it is built the slow way)."""
  load = examples.load if split_kind == "classification" else packing.load
  try:
    with open(index) as f:
      entry = json.load(f)
    if tokenizer is not None:
      tok = tokenizer
    elif data.tokenizer == "hf":
      tok = tokenizer_lib.load_hf(data.tokenizer_path)
    elif entry["tokenizer_file"] is None:
      tok = tokenizer_lib.ByteTokenizer()
    else:
      with open(entry["tokenizer_file"], "rb") as f:
        tok = tokenizer_lib.SentencePieceTokenizer(f.read(), entry["tokenizer_file"])
    train, _ = load(entry["train"])
    validation, meta = load(entry["validation"])
  except (OSError, ValueError, KeyError, TypeError, UserError):
    return None  # missing, stale or damaged: rebuild from the dataset
  return Corpus(tok, train, validation, meta["zlib_bits_per_byte"], entry["cache_dir"], tuple(entry["class_names"]))


def _write_json_atomic(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)
