"""Labelled examples for sequence classification: one example per row.

Each example becomes [BOS] + ids + [EOS], cut to the row length (keeping the EOS,
whose final hidden state the classifier reads by default), then padded. Rows are
random access by example index, so Grain's shuffle and exact resume work as for
packed text.
"""

import dataclasses
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class ExampleSet:
  tokens: np.ndarray  # [num_tokens] every example's ids, end to end (no BOS/EOS)
  starts: np.ndarray  # [num_examples + 1] int64 offsets into tokens
  labels: np.ndarray  # [num_examples] int32
  bos_id: int
  eos_id: int
  num_bytes: int = 0

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  def num_rows(self, seq_len: int, *, drop_remainder: bool) -> int:
    del seq_len, drop_remainder  # always one example per row
    return self.num_examples

  def row(self, i: int, seq_len: int) -> dict[str, np.ndarray]:
    ids = self.tokens[self.starts[i] : self.starts[i + 1]][: seq_len - 2]
    n = len(ids) + 2
    inputs = np.zeros(seq_len, np.int32)
    inputs[0], inputs[1 : n - 1], inputs[n - 1] = self.bos_id, ids, self.eos_id
    real = np.arange(seq_len) < n
    return {"inputs": inputs, "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
            "label": np.int32(self.labels[i])}

  def empty_row(self, seq_len: int) -> dict[str, np.ndarray]:
    z = np.zeros(seq_len, np.int32)
    return {"inputs": z, "segment_ids": z, "positions": z, "label": np.int32(0)}


def from_examples(ids_per_example, labels, bos_id: int, eos_id: int, dtype, num_bytes: int = 0) -> ExampleSet:
  lengths = np.array([len(ids) for ids in ids_per_example], np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.concatenate([np.asarray(ids, dtype) for ids in ids_per_example]) if len(lengths) else np.zeros(0, dtype)
  return ExampleSet(tokens, starts, np.asarray(labels, np.int32), bos_id, eos_id, int(num_bytes))


def save(examples: ExampleSet, directory: str, meta: dict) -> None:
  """Plain .npy arrays + JSON; the directory appears atomically."""
  tmp = f"{directory}.tmp{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  for name in ("tokens", "starts", "labels"):
    np.save(os.path.join(tmp, f"{name}.npy"), getattr(examples, name))
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump({**meta, "num_bytes": examples.num_bytes, "bos_id": examples.bos_id, "eos_id": examples.eos_id}, f)
  os.replace(tmp, directory)


def load(directory: str) -> tuple[ExampleSet, dict]:
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  arrays = {n: np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r", allow_pickle=False)
            for n in ("tokens", "starts", "labels")}
  return ExampleSet(arrays["tokens"], np.asarray(arrays["starts"]), np.asarray(arrays["labels"]), meta["bos_id"],
                    meta["eos_id"], meta["num_bytes"]), meta
