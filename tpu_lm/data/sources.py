"""From `data.dataset` to tokenized splits: build (once), tokenize (once), cache.

`python_stdlib` and `text_files` are the project's own offline TFDS builders;
any other name is looked up in the TFDS catalog (which downloads, so it needs a
network the first time). The tokenizer and each tokenized split are cached in a
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

from tpu_lm.data import local_files, packing
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError

OWN_BUILDERS = ("python_stdlib", "text_files")
_CACHE_FORMAT = 1  # bump when the tokenized-split layout changes


@dataclasses.dataclass(frozen=True)
class Corpus:
  tokenizer: tokenizer_lib.Tokenizer
  train: packing.TokenStream
  validation: packing.TokenStream
  zlib_bits_per_byte: float  # `zlib -9` on the validation text, as a reference
  cache_dir: str


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


def _check_text_key(source, data) -> None:
  if len(source) == 0:
    raise UserError(f"split {data.train_split!r} of {data.dataset!r} is empty: choose another split.")
  keys = set(source[0])
  if data.text_key not in keys:
    raise UserError(
        f"dataset {data.dataset!r} has no feature {data.text_key!r}: set data.text_key"
        f" to one of {sorted(keys)}."
    )


def _tokenized(source, data, tok, directory: str) -> tuple[packing.TokenStream, dict]:
  """The split as a TokenStream, read from the cache or tokenized and cached."""
  if os.path.exists(os.path.join(directory, "meta.json")):
    return packing.load(directory)
  ids, num_bytes, raw = [], 0, []
  texts = list(_texts(source, data.text_key, data.max_documents))
  for i in range(0, len(texts), 512):
    ids.extend(tok.encode_batch(texts[i : i + 512]))
  for t in texts:
    b = t.encode("utf-8")
    num_bytes += len(b)
    raw.append(b)
  stream = packing.from_documents(
      ids, num_bytes, tok.bos_id, tok.eos_id, tokenizer_lib.token_dtype(tok.vocab_size),
  )
  all_bytes = b"\n".join(raw)
  meta = {
      "format": _CACHE_FORMAT,
      "num_docs": len(texts),
      "zlib_bits_per_byte": 8 * len(zlib.compress(all_bytes, 9)) / max(len(all_bytes), 1),
  }
  packing.save(stream, directory, meta)
  return stream, meta


def prepare(data) -> Corpus:
  """Builds or loads everything the run reads: tokenizer and both splits.

  A warm start (tokenizer and both tokenized splits cached for exactly this data
  config and these files) reads the cache alone, without importing TensorFlow.
  """
  index = _warm_index_path(data)
  warm = _load_warm(index)
  if warm is not None:
    return warm
  b = _builder(data)
  cache_dir = os.path.join(b.data_dir, "tpu_lm")
  train_src = b.as_data_source(split=data.train_split)
  eval_src = b.as_data_source(split=data.eval_split)
  _check_text_key(train_src, data)
  tok_file = None
  if data.tokenizer == "bytes":
    tok = tokenizer_lib.ByteTokenizer()
  else:
    tok_file = os.path.join(cache_dir, f"spm{data.vocab_size}.model")
    tok = tokenizer_lib.load_or_train(
        tok_file, data.vocab_size, _texts(train_src, data.text_key, data.max_documents)
    )
  suffix = f"-max{data.max_documents}" if data.max_documents > 0 else ""
  dirs = {split: os.path.join(cache_dir, f"{tok.name}-{split}{suffix}") for split in (data.train_split, data.eval_split)}
  train, _ = _tokenized(train_src, data, tok, dirs[data.train_split])
  validation, meta = _tokenized(eval_src, data, tok, dirs[data.eval_split])
  _write_json_atomic(index, {"tokenizer_file": tok_file, "train": dirs[data.train_split],
                             "validation": dirs[data.eval_split], "cache_dir": cache_dir})
  return Corpus(tok, train, validation, meta["zlib_bits_per_byte"], cache_dir)


def _warm_index_path(data) -> str:
  """Where the cache of this exact data config is recorded: keyed by every field that
  changes the tokens, and for local corpora by a fingerprint of their files."""
  if data.dataset == "python_stdlib":
    source = ["python_stdlib", sys.version_info[:2], local_files.fingerprint(*local_files.stdlib_files())]
  elif data.dataset == "text_files":
    source = ["text_files", local_files.fingerprint(*local_files.user_files(data.path))]
  else:
    source = ["tfds", data.dataset]  # a prepared catalog dataset does not change
  key = json.dumps([_CACHE_FORMAT, source, data.train_split, data.eval_split, data.text_key,
                    data.max_documents, data.tokenizer, data.vocab_size if data.tokenizer != "bytes" else 0])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  return os.path.join(os.path.expanduser(data.data_dir), "tpu_lm_warm", f"{digest}.json")


def _load_warm(index: str) -> Corpus | None:
  """The corpus from a complete cache, or None (then it is built the slow way)."""
  try:
    with open(index) as f:
      entry = json.load(f)
    if entry["tokenizer_file"] is None:
      tok = tokenizer_lib.ByteTokenizer()
    else:
      with open(entry["tokenizer_file"], "rb") as f:
        tok = tokenizer_lib.SentencePieceTokenizer(f.read(), entry["tokenizer_file"])
    train, _ = packing.load(entry["train"])
    validation, meta = packing.load(entry["validation"])
  except (OSError, ValueError, KeyError, TypeError, UserError):
    return None  # missing, stale or damaged: rebuild from the dataset
  return Corpus(tok, train, validation, meta["zlib_bits_per_byte"], entry["cache_dir"])


def _write_json_atomic(path: str, obj: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f)
  os.replace(tmp, path)
