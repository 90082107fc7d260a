"""Grain pipelines over packed rows: a checkpointable train iterator and eval batches.

Rows are random access (`packing.make_row`), so the train order is a seeded
shuffle of row indices that reshuffles every epoch, and the iterator's state is
a single index that Orbax saves with the model: resume continues exactly.

Each process reads only its own slice of every global batch: global batch `b`
is rows [b*G, (b+1)*G) of the shuffled order, and process `h` of `H` takes the
h-th contiguous block of G/H of them.

A split is anything with `num_rows(seq_len, drop_remainder)`, `row(i, seq_len)`
and `empty_row(seq_len)`: a packed `packing.TokenStream`, or an
`examples.ExampleSet` of one labelled example per row.
"""

import functools

import grain
import numpy as np

from tpu_lm.data import packing
from tpu_lm.errors import UserError

_READ = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def train_iter(
    stream: packing.TokenStream,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
  num_rows = stream.num_rows(seq_len, drop_remainder=True)
  if num_rows < global_batch:
    raise UserError(
        f"the training split packs into {num_rows} rows of {seq_len} tokens, fewer than"
        f" one global batch ({global_batch}): use more data, a smaller"
        " data.global_batch_size or a shorter data.seq_len."
    )
  per_process = global_batch // process_count
  ds = (
      grain.MapDataset.range(num_rows)
      .shuffle(seed=seed)
      .repeat(None)
      .map(functools.partial(_row, stream, seq_len))
      .batch(per_process, drop_remainder=True)
  )
  ds = ds[process_index::process_count]
  return iter(ds.to_iter_dataset(_READ))


def eval_batches(
    stream: packing.TokenStream,
    *,
    seq_len: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
):
  """Every row of the split once, in order; the last batch is padded with empty rows."""
  num_rows = stream.num_rows(seq_len, drop_remainder=False)
  padded = -(-num_rows // global_batch) * global_batch
  per_process = global_batch // process_count

  def row_or_pad(i):
    return stream.row(i, seq_len) if i < num_rows else stream.empty_row(seq_len)

  ds = grain.MapDataset.range(padded).map(row_or_pad).batch(per_process)
  return ds[process_index::process_count].to_iter_dataset(_READ)


def _row(stream, seq_len, i):
  return stream.row(int(i), seq_len)


def first_tokens(stream: packing.TokenStream, num: int, length: int) -> np.ndarray:
  """The first `length` tokens of the first `num` documents long enough: sample prompts."""
  prompts = []
  for d in range(stream.num_docs if num else 0):
    start, end = stream.doc_starts[d], stream.doc_starts[d + 1]
    if end - start > length:
      prompts.append(np.asarray(stream.tokens[start : start + length], np.int32))
    if len(prompts) == num:
      break
  return np.stack(prompts) if prompts else np.zeros((0, length), np.int32)
