"""From `data.dataset` to the run's splits and tokenizer.

`python_stdlib`, `instructions` and `stdlib_functions` are the project's own
offline TFDS builders (built once into `data.data_dir`, ArrayRecord); `text_files`
reads your files directly, one document per file, nothing built; any other name is
a TFDS catalog dataset (downloaded and prepared on first use, where a network
exists), read in the format TFDS prepared it in (ArrayRecord, or TFRecord as for
C4). Nothing is tokenized ahead: the splits are document sources that the input
pipeline tokenizes as it reaches them (pipeline.py).

The SentencePiece tokenizer is trained once on a bounded, seeded sample of the
training split (the first `data.tokenizer_sample_mb` of it in a fixed shuffled
order), fed in a fixed order: every process that trains it from the same data gets
the same vocabulary, with or without a shared disk. It is cached under a name
that records how it was made.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import zlib

from grain.experimental import index_shuffle

from tpu_lm.config import derived
from tpu_lm.data import documents, local_files
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.data.encode import Encoder
from tpu_lm.data.pipeline import Split
from tpu_lm.errors import UserError

OWN_BUILDERS = ("python_stdlib", "instructions", "stdlib_functions")
_ZLIB_SAMPLE_BYTES = 16 << 20  # the zlib reference reads at most this much validation text


@dataclasses.dataclass(frozen=True)
class Corpus:
  tokenizer: tokenizer_lib.Tokenizer
  train: Split
  validation: Split
  zlib_bits_per_byte: float  # `zlib -9` on (the first 16 MB of) the validation text, as a reference; 0: not text
  cache_dir: str
  class_names: tuple = ()  # classification: the label feature's names


@contextlib.contextmanager
def _building(data_dir: str, dataset: str):
  """Holds a lock file in `data_dir` while `dataset` is built: processes that start
  together (a sweep's trials, runs side by side) build it once, one after another,
  where two builds at once ended in one renaming its folder over the other's. A bucket
  (gs://...) has no file locks, and a read-only directory is built already: neither is
  locked."""
  try:
    if "://" in data_dir:
      raise OSError("no file locks in a bucket")
    os.makedirs(data_dir, exist_ok=True)
    lock = open(os.path.join(data_dir, f".{dataset.replace('/', '_')}.lock"), "a")
  except OSError:  # a bucket, or a read-only directory (a dataset built by someone else): nothing to serialise
    yield
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _builder(data):
  """The TFDS builder for `data.dataset`, prepared (built or downloaded) on disk."""
  from tpu_lm.data import builders  # imports TFDS: only where a dataset is opened
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  logging.getLogger("absl").setLevel(logging.ERROR)  # e.g. "Using custom data configuration"
  data_dir = os.path.expanduser(data.data_dir)

  def new_builder():
    if data.dataset == "python_stdlib":
      return builders.PythonStdlib(data_dir=data_dir)
    if data.dataset == "instructions":
      return builders.Instructions(path=data.path, data_dir=data_dir)
    if data.dataset == "stdlib_functions":
      return builders.StdlibFunctions(data_dir=data_dir)
    try:
      return tfds.builder(data.dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(
          f"data.dataset {data.dataset!r} is neither one of {OWN_BUILDERS + ('text_files',)} nor a TFDS catalog"
          " dataset: check the name (e.g. 'tiny_shakespeare', 'lm1b', 'c4/en')."
      ) from None

  try:
    with _building(data_dir, data.dataset):
      b = new_builder()  # under the lock: a builder made while another built would read no splits
      if data.dataset in OWN_BUILDERS:
        b.download_and_prepare(file_format="array_record")
      elif not b.is_prepared():
        b.download_and_prepare()  # the catalog's own format; both are read below
  except PermissionError as e:
    raise UserError(f"cannot write the dataset to {data_dir} ({e.strerror}): set data.data_dir to a writable"
                    " directory.") from None
  except OSError as e:
    if data.dataset in OWN_BUILDERS:
      raise
    raise UserError(f"could not download TFDS dataset {data.dataset!r} ({e}): this needs a network connection the"
                    " first time (or a data.data_dir where it is prepared, such as a gs:// bucket).") from None
  for split in (data.train_split, data.eval_split):
    if split not in b.info.splits:
      raise UserError(f"dataset {data.dataset!r} has no split {split!r}: use one of {sorted(b.info.splits)} for"
                      " data.train_split / data.eval_split.")
  return b


def _tfds_source(builder, split: str):
  file_format = getattr(builder.info, "file_format", None)
  if "array_record" in str(getattr(file_format, "value", file_format)).lower():
    return documents.TFDSSource(builder, split)
  return documents.TFRecordSource(builder, split)


@dataclasses.dataclass(frozen=True)
class Sources:
  """A dataset's splits as document sources, before any tokenizer."""

  train: object
  validation: object
  cache_dir: str
  class_names: tuple = ()  # the data.label_key feature's names, where it is a class label


def open_splits(data) -> Sources:
  """The train and validation splits of `data.dataset` (built or downloaded first if
  need be), cut to data.max_documents; nothing read yet."""
  train, validation, cache, names = _open_all(data)
  if data.max_documents > 0:
    train, validation = documents.First(train, data.max_documents), documents.First(validation, data.max_documents)
  return Sources(train, validation, cache, names)


def _open_all(data):
  if data.dataset == "text_files":
    root, rel = local_files.user_files(data.path)
    split = local_files.split_files(rel)
    cache = os.path.join(os.path.expanduser(data.data_dir), "tpu_lm_text_files", local_files.fingerprint(root, rel))
    return documents.FilesSource(root, split["train"]), documents.FilesSource(root, split["validation"]), cache, ()
  b = _builder(data)
  names = ()
  if data.label_key in b.info.features and hasattr(b.info.features[data.label_key], "names"):
    names = tuple(b.info.features[data.label_key].names)
  return (_tfds_source(b, data.train_split), _tfds_source(b, data.eval_split), os.path.join(b.data_dir, "tpu_lm"),
          names)


def _check_features(source, data, objective) -> None:
  if len(source) == 0:
    raise UserError(f"split {data.train_split!r} of {data.dataset!r} is empty: choose another split.")
  keys = set(source.get([0])[0])
  for field, key in objective.features():
    if key not in keys:
      raise UserError(f"dataset {data.dataset!r} has no feature {key!r}: set {field} to one of {sorted(keys)}.")


def sample_texts(source, objective, max_bytes: int, seed: int = 0):
  """Documents in a fixed shuffled order until `max_bytes` of text: the tokenizer's
  training sample (the same on every process and machine)."""
  n, total = len(source), 0
  for start in range(0, n, 256):
    order = [index_shuffle(i, max_index=n - 1, seed=seed, rounds=4) if n > 1 else 0
             for i in range(start, min(start + 256, n))]
    for record in source.get(order):
      text = objective.sample_text(record)
      yield text
      total += len(text.encode("utf-8"))
      if total >= max_bytes:
        return


def _tokenizer(data, train, objective, cache_dir: str):
  if data.tokenizer == "bytes":
    return tokenizer_lib.ByteTokenizer()
  if data.tokenizer == "hf":
    return tokenizer_lib.load_hf(data.tokenizer_path)
  if data.tokenizer_path:  # a SentencePiece model made elsewhere (another run's, say)
    return tokenizer_lib.load_sentencepiece(os.path.abspath(os.path.expanduser(data.tokenizer_path)), data.vocab_size)
  recipe = f"{data.dataset}|{data.train_split}|{data.text_key}|{objective.records}|{data.tokenizer_sample_mb}|{data.vocab_size}"
  name = f"spm{data.vocab_size}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}.model"
  texts = sample_texts(train, objective, int(data.tokenizer_sample_mb * 2**20))
  return tokenizer_lib.load_or_train(os.path.join(cache_dir, name), data.vocab_size, texts)


def _zlib_reference(validation, objective) -> float:
  """`zlib -9` bits per byte on the validation text (its first 16 MB), as a yardstick."""
  if not objective.text_reference:
    return 0.0
  raw, size = [], 0
  for start in range(0, len(validation), 256):
    for record in validation.get(range(start, min(start + 256, len(validation)))):
      raw.append(objective.sample_text(record).encode("utf-8"))
      size += len(raw[-1])
    if size >= _ZLIB_SAMPLE_BYTES:
      break
  blob = b"\n".join(raw)[:_ZLIB_SAMPLE_BYTES]
  return 8 * len(zlib.compress(blob, 9)) / max(len(blob), 1)


def prepare(data, splits: Sources, objective, tokenizer: tokenizer_lib.Tokenizer | None = None) -> Corpus:
  """The corpus an objective trains on: the splits, checked for the features it reads,
  and the tokenizer (given, e.g. a fine-tuned run's; read; or trained once and cached)."""
  _check_features(splits.train, data, objective)
  if objective.labels and not splits.class_names:
    raise UserError(f"feature {data.label_key!r} of {data.dataset!r} is not a class label: set data.label_key.")
  tok = tokenizer or _tokenizer(data, splits.train, objective, splits.cache_dir)
  tok = tokenizer_lib.add_sentinels(tok, derived.sentinels(data, objective))
  split = lambda source, randomize: Split(source, Encoder(tok, objective, randomize), tok.bos_id,  # noqa: E731
                                          tok.eos_id, objective.layout)
  return Corpus(tok, split(splits.train, True), split(splits.validation, False),
                _zlib_reference(splits.validation, objective), splits.cache_dir, splits.class_names)
