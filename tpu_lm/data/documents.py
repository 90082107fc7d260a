"""Document sources: random access to the records of one split, read on demand.

Every source has `len(source)` and `source.get(indices) -> [record dict]`; nothing
is read before it is asked for, so memory does not grow with the corpus. Kinds:

- `TFDSSource`: a prepared TFDS split in ArrayRecord (the project's own builders,
  catalog datasets prepared that way), through `builder.as_data_source`.
- `TFRecordSource`: a catalog split TFDS prepared as TFRecord (C4 and most large
  text sets). TFRecord has no index, so each file's record offsets are found once
  (a scan of the 12-byte record headers, seeking past the payloads) and kept next
  to the file as `<file>.tpu_lm_index.npy`; a record is then one seek and one read.
- `FilesSource`: local text files (`text_files`), one document per file, read when
  asked for: a corpus of any size starts in the time it takes to list it.
- `TokenSource`: documents already tokenized, in memory (tests, tiny corpora).
"""

import glob
import io
import os
import struct

import numpy as np

from tpu_lm import storage
from tpu_lm.data import local_files
from tpu_lm.errors import UserError


class FilesSource:
  def __init__(self, root, relpaths: list[str]):
    self.root, self.relpaths = root, list(relpaths)

  def __len__(self):
    return len(self.relpaths)

  def get(self, indices):
    return [{"text": local_files.read_text(self.root / self.relpaths[i]), "path": self.relpaths[i]} for i in indices]


class TFDSSource:
  """An ArrayRecord split of a prepared TFDS builder."""

  def __init__(self, builder, split: str):
    self._source = builder.as_data_source(split=split)

  def __len__(self):
    return len(self._source)

  def get(self, indices):
    return self._source.__getitems__(list(indices)) if hasattr(self._source, "__getitems__") else [
        self._source[i] for i in indices]


class TFRecordSource:
  """A TFRecord split of a prepared TFDS builder, with per-file record offsets."""

  def __init__(self, builder, split: str):
    info = builder.info.splits[split]
    self._features = builder.info.features
    self._files = [os.path.join(builder.data_dir, str(f)) for f in getattr(info, "filenames", [])]
    if not self._files:
      self._files = sorted(glob.glob(os.path.join(builder.data_dir, f"{builder.name}-{split}.tfrecord*")))
    if not self._files:
      raise UserError(f"{builder.name} split {split!r} has no TFRecord files in {builder.data_dir}: prepare it first.")
    self._offsets = [_record_offsets(f) for f in self._files]
    self._starts = np.concatenate([[0], np.cumsum([len(o) for o in self._offsets])])

  def __len__(self):
    return int(self._starts[-1])

  def get(self, indices):
    indices = list(indices)
    files = np.searchsorted(self._starts, indices, side="right") - 1
    out = [None] * len(indices)
    for f in np.unique(files):  # each file opened once per call (a bucket read costs a round trip)
      with storage.open(self._files[f], "rb") as fh:
        for k in np.flatnonzero(files == f):
          fh.seek(int(self._offsets[f][indices[k] - self._starts[f]]))
          (length,) = struct.unpack("<Q", fh.read(8))
          fh.read(4)  # the length's CRC
          out[k] = self._features.deserialize_example_np(fh.read(length))
    return out


def _record_offsets(path: str) -> np.ndarray:
  """Byte offsets of every record in a TFRecord file, cached beside it (a prepared
  TFDS file never changes in place)."""
  index = f"{path}.tpu_lm_index.npy"
  if storage.exists(index):
    if storage.is_url(index):
      with storage.open(index, "rb") as f:
        return np.load(f, allow_pickle=False)
    return np.load(index, mmap_mode="r", allow_pickle=False)
  offsets, size = [], storage.getsize(path)
  with storage.open(path, "rb") as f:
    pos = 0
    while pos < size:
      offsets.append(pos)
      f.seek(pos)
      (length,) = struct.unpack("<Q", f.read(8))
      pos += 8 + 4 + length + 4  # length, its CRC, the payload, its CRC
  out = np.asarray(offsets, np.int64)
  try:
    buffer = io.BytesIO()
    np.save(buffer, out)
    storage.write_atomic(index, buffer.getvalue())
  except Exception:  # a read-only dataset directory (a public bucket): keep it in memory only
    pass
  return out


class TokenSource:
  """Pre-tokenized documents (lists of ids), for tests and small in-memory corpora."""

  def __init__(self, docs, num_bytes: list[int] | None = None):
    self.docs = [np.asarray(d) for d in docs]
    self.num_bytes = num_bytes or [0] * len(self.docs)

  def __len__(self):
    return len(self.docs)

  def get(self, indices):
    return [{"ids": self.docs[i], "num_bytes": self.num_bytes[i]} for i in indices]


class First:
  """The first `n` documents of a source (data.max_documents)."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self):
    return self._n

  def get(self, indices):
    return self._source.get(indices)
