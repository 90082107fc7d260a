"""Packing documents into fixed-length rows, with random access by row index.

A split is one `TokenStream`: every document as [BOS] + ids + [EOS], laid end to
end. A document of n+1 tokens gives n (input, target) pairs; the pairs of all
documents, in order, are cut into rows of `seq_len`. So every target token is
predicted exactly once (what bits-per-byte over the whole split needs), nothing
is padded but the last row, and row `i` is computed from `i` alone, which makes
data order a pure function of the step.

Inside a row, `segment_ids` number the documents (1, 2, ...; 0 is padding) so
attention never crosses a document boundary, and `positions` restart at each
document start and at each row start.

A stream may carry a `loss_mask` (instruction tuning: 1 on completion tokens and
the closing EOS, 0 on [BOS] and the prompt): it travels with the tokens through
packing, and each row's `loss_mask` says which of its targets count.
"""

import dataclasses
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class TokenStream:
  tokens: np.ndarray  # [num_tokens] all documents, each [BOS] + ids + [EOS]
  doc_starts: np.ndarray  # [num_docs + 1] int64 offsets into tokens
  num_bytes: int  # UTF-8 bytes of the text the stream encodes (that the loss covers)
  loss_mask: np.ndarray | None = None  # [num_tokens] uint8: 1 where the token counts as a target

  @property
  def num_docs(self) -> int:
    return len(self.doc_starts) - 1

  @property
  def num_pairs(self) -> int:
    return len(self.tokens) - self.num_docs

  @property
  def pair_starts(self) -> np.ndarray:
    # Each document has one pair fewer than tokens.
    return self.doc_starts - np.arange(self.num_docs + 1)

  def num_rows(self, seq_len: int, *, drop_remainder: bool) -> int:
    full, rest = divmod(self.num_pairs, seq_len)
    return full + (1 if rest and not drop_remainder else 0)

  def row(self, i: int, seq_len: int) -> dict[str, np.ndarray]:
    return make_row(self, i, seq_len)

  def empty_row(self, seq_len: int) -> dict[str, np.ndarray]:
    row = empty_row(seq_len)
    if self.loss_mask is not None:
      row["loss_mask"] = np.zeros(seq_len, np.int32)
    return row


def from_documents(
    ids_per_doc: list[list[int]], num_bytes: int, bos_id: int, eos_id: int, dtype, prompt_lengths=None,
) -> TokenStream:
  """`prompt_lengths[d]`: the first that many ids of document d are a prompt, not
  targets (instruction tuning); None: every token after [BOS] is a target."""
  lengths = np.array([len(ids) + 2 for ids in ids_per_doc], dtype=np.int64)
  doc_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  tokens = np.empty(int(doc_starts[-1]), dtype=dtype)
  for start, ids in zip(doc_starts[:-1], ids_per_doc):
    tokens[start] = bos_id
    tokens[start + 1 : start + 1 + len(ids)] = ids
    tokens[start + 1 + len(ids)] = eos_id
  mask = None
  if prompt_lengths is not None:
    mask = np.ones(len(tokens), np.uint8)
    for start, n in zip(doc_starts[:-1], prompt_lengths):
      mask[start : start + 1 + n] = 0  # [BOS] and the prompt are never targets
  return TokenStream(tokens, doc_starts, int(num_bytes), mask)


def make_row(stream: TokenStream, row: int, seq_len: int) -> dict[str, np.ndarray]:
  """Row `row` of the packed stream: inputs, targets, segment_ids, positions."""
  pair_starts = stream.pair_starts
  p = row * seq_len + np.arange(seq_len, dtype=np.int64)
  valid = p < stream.num_pairs
  p = np.minimum(p, stream.num_pairs - 1)
  doc = np.searchsorted(pair_starts, p, side="right") - 1
  tok = p + doc
  row_start = row * seq_len
  segment_ids = (doc - doc[0] + 1) * valid
  positions = (p - np.maximum(pair_starts[doc], row_start)) * valid
  out = {
      "inputs": np.where(valid, stream.tokens[tok], 0).astype(np.int32),
      "targets": np.where(valid, stream.tokens[tok + 1], 0).astype(np.int32),
      "segment_ids": segment_ids.astype(np.int32),
      "positions": positions.astype(np.int32),
  }
  if stream.loss_mask is not None:
    out["loss_mask"] = (stream.loss_mask[tok + 1] * valid).astype(np.int32)
  return out


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
  """An all-padding row (weight zero), to fill the last eval batch."""
  z = np.zeros(seq_len, np.int32)
  return {"inputs": z, "targets": z, "segment_ids": z, "positions": z}


def save(stream: TokenStream, directory: str, meta: dict) -> None:
  """Writes the stream as plain .npy arrays + JSON; the directory appears atomically."""
  tmp = f"{directory}.tmp{os.getpid()}"
  os.makedirs(tmp, exist_ok=True)
  np.save(os.path.join(tmp, "tokens.npy"), stream.tokens)
  np.save(os.path.join(tmp, "doc_starts.npy"), stream.doc_starts)
  if stream.loss_mask is not None:
    np.save(os.path.join(tmp, "loss_mask.npy"), stream.loss_mask)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump({**meta, "num_bytes": stream.num_bytes}, f)
  os.replace(tmp, directory)


def load(directory: str) -> tuple[TokenStream, dict]:
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  # Memory-mapped, never unpickled: a large split costs no RAM until read.
  tokens = np.load(os.path.join(directory, "tokens.npy"), mmap_mode="r", allow_pickle=False)
  doc_starts = np.load(os.path.join(directory, "doc_starts.npy"), allow_pickle=False)
  mask_file = os.path.join(directory, "loss_mask.npy")
  mask = np.load(mask_file, mmap_mode="r", allow_pickle=False) if os.path.exists(mask_file) else None
  return TokenStream(tokens, doc_starts, int(meta["num_bytes"]), mask), meta
