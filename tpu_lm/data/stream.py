"""Streaming a split into fixed-length rows: one stream per row of the global batch.

Row r of every global batch comes from its own stream over the documents r, r + G,
r + 2G, ... of the split (G = the global batch size), in an order that is a seeded
permutation per epoch (Grain's `index_shuffle`, O(1) memory), tokenized when
reached. A document of n + 1 tokens ([BOS] + ids + [EOS]) gives n (input, target)
pairs; inside a row, `segment_ids` number the documents (0 is padding) and
`positions` restart at each document and each row. An encoder's document (one whose
objective gives the ids it reads apart from its targets: the masked LM) gives n + 2
pairs instead: each position, BOS and EOS included, reads its input and predicts its
own token.

Training (`BlockStream`) takes the epoch's documents a block at a time (`block_docs`
of them), packs the block's pairs end to end into rows and emits those rows in a
seeded random order: consecutive batches then do not walk through one long
document row after row (a whole file of the standard library fills ~25 rows), and
every target is still predicted once per epoch. Only the block's last row is padded.
Eval, and the one-example-per-row layout an objective may ask for (layout.py), read
documents with `ShardStream`: in order (a bounded eval: a seeded order), or one per row.

A stream's whole state is three integers (training: epoch, block, rows of the
block emitted; eval: epoch, position, pairs of the current document emitted), and
a row depends on nothing but its shard and that state. So a process that serves rows [a, b) runs streams a..b-1,
the global state is the G triples, and a run resumes exactly on any number of
processes: each takes the triples of its own rows. (Grain's `ElasticIterator`,
which reshards a pipeline on restore, refuses packing, a many-to-one step without
a fixed ratio; a per-process Grain pipeline's state does not survive a change in
the number of processes.) Memory holds a few documents per stream, whatever the
corpus size.

`Loader` builds this process's rows of each global batch in a background thread,
a few batches ahead, tokenizing the documents every stream needs next in one
batched call.
"""

import atexit
import queue
import threading
import weakref
from typing import NamedTuple

import numpy as np
from grain.experimental import index_shuffle

from tpu_lm.data.encode import Encoded
from tpu_lm.errors import UserError


class _Doc(NamedTuple):
  """A tokenized document: pair i of its rows reads tokens[i] and predicts targets[i + 1]
  (a decoder's targets are its tokens; an encoder's, `supply`), counted where mask[i + 1]."""

  tokens: np.ndarray  # with BOS and EOS
  mask: np.ndarray
  num_bytes: int
  label: int
  targets: np.ndarray
  image: np.ndarray | None = None  # pixels the document is read after (its image slots lead `tokens`)
  prefix: int = 0  # leading tokens read both ways (the image slots, BOS and a prompt)


class ShardStream:
  def __init__(self, source, *, shard: int, num_shards: int, seq_len: int, seed: int, bos_id: int, eos_id: int,
               shuffle: bool = True, one_pass: bool = False, max_rows: int = 0, one_per_row: bool = False,
               loss_mask: bool = False, with_bytes: bool = False, image: tuple = ()):
    self.shard, self.num_shards, self.seq_len, self.seed = shard, num_shards, seq_len, seed
    self.image = tuple(image)
    self.bos_id, self.eos_id = bos_id, eos_id
    self.shuffle, self.one_pass, self.max_rows = shuffle, one_pass, max_rows
    self.one_per_row, self.loss_mask, self.with_bytes = one_per_row, loss_mask, with_bytes
    self.num_docs = len(range(shard, len(source), num_shards))
    self.epoch = self.pos = self.offset = 0
    self.rows_made = 0
    self.done = self.num_docs == 0 and one_pass
    self._cache: dict[tuple, _Doc] = {}  # (epoch, pos) -> the document, tokenized

  # -- state -------------------------------------------------------------------------------------------------------

  def state(self) -> tuple[int, int, int]:
    return self.epoch, self.pos, self.offset

  def set_state(self, state) -> None:
    self.epoch, self.pos, self.offset = (int(v) for v in state)
    self._cache.clear()

  # -- which documents, in which order ---------------------------------------------------------------------------------

  def doc_index(self, epoch: int, pos: int) -> int:
    local = pos
    if self.shuffle and self.num_docs > 1:
      seed = (self.seed * 1_000_003 + self.shard * 7_919 + epoch * 104_729) % (1 << 31)
      local = index_shuffle(pos, max_index=self.num_docs - 1, seed=seed, rounds=4)
    return self.shard + self.num_shards * local

  def upcoming(self, count: int) -> list[tuple[int, int]]:
    """The (epoch, pos) keys of the next `count` documents not cached yet."""
    keys, epoch, pos = [], self.epoch, self.pos
    for _ in range(count if self.num_docs else 0):
      if self.one_pass and pos >= self.num_docs:
        break
      if (epoch, pos) not in self._cache:
        keys.append((epoch, pos))
      pos += 1
      if pos == self.num_docs:
        if self.one_pass:
          break
        epoch, pos = epoch + 1, 0
    return keys

  def supply(self, key, encoded: Encoded) -> None:
    tokens = np.concatenate([[self.bos_id], encoded.ids, [self.eos_id]]).astype(np.int32)
    if encoded.image is not None:  # read after its image: slots the vision encoder fills lead the document
      slots = encoded.image_slots
      tokens = np.concatenate([np.zeros(slots, np.int32), tokens])
      mask = np.zeros(len(tokens), np.int32)  # neither the slots nor BOS are predicted
      mask[slots + 1:] = 1
      if encoded.weights is not None:
        mask[slots + 1:-1] = encoded.weights
      self._cache[key] = _Doc(tokens, mask, encoded.num_bytes, encoded.label, tokens, encoded.image,
                              slots + 1 + encoded.prefix)
      return
    if encoded.inputs is None:  # a decoder's: each token's target is the next
      mask = np.ones(len(tokens), np.int32)  # per token, as a target: 1 if it counts (BOS never is, EOS always)
      mask[0] = 0
      if encoded.weights is not None:
        mask[1:-1] = encoded.weights
      self._cache[key] = _Doc(tokens, mask, encoded.num_bytes, encoded.label, tokens, None, 1 + encoded.prefix)
      return
    # An encoder's: position i reads inputs[i] and predicts tokens[i]. Rows pair input i
    # with target i + 1, so the targets move one place right (a pad in front) and the
    # inputs gain a pad at the end: every position, BOS and EOS too, is one pair.
    read = np.concatenate([[self.bos_id], encoded.inputs, [self.eos_id], [self.eos_id]]).astype(np.int32)
    targets = np.concatenate([[self.eos_id], tokens]).astype(np.int32)
    mask = np.zeros(len(targets), np.int32)
    mask[2:-1] = 1 if encoded.weights is None else encoded.weights
    self._cache[key] = _Doc(read, mask, encoded.num_bytes, encoded.label, targets)

  # -- rows --------------------------------------------------------------------------------------------------------

  def next_row(self, fetch) -> dict[str, np.ndarray]:
    """The next row; `fetch(keys)` supplies documents the cache lacks."""
    if self.num_docs == 0 and not self.one_pass:
      raise UserError(f"the split has fewer documents than data.global_batch_size rows (shard {self.shard} is"
                      " empty): use more data or a smaller data.global_batch_size.")
    if self.max_rows and self.rows_made >= self.max_rows:
      self.done = True
    self.rows_made += 1
    if self.one_per_row:
      return self._example_row(fetch)
    return self._packed_row(fetch)

  def _doc(self, fetch):
    key = (self.epoch, self.pos)
    if key not in self._cache:
      fetch(self, [key] + self.upcoming(8)[1:])
    return self._cache[key]

  def _advance_doc(self) -> None:
    self._cache.pop((self.epoch, self.pos), None)
    self.pos, self.offset = self.pos + 1, 0
    if self.pos == self.num_docs:
      if self.one_pass:
        self.done = True
      else:
        self.epoch, self.pos = self.epoch + 1, 0

  def _packed_row(self, fetch):
    t = self.seq_len
    inputs, targets, seg, positions, mask = (np.zeros(t, np.int32) for _ in range(5))
    filled, segment, row_bytes, row_docs = 0, 0, 0.0, 0
    while filled < t and not self.done:
      doc = self._doc(fetch)
      pairs = len(doc.tokens) - 1
      take = min(pairs - self.offset, t - filled)
      a, b = self.offset, self.offset + take
      segment += 1
      inputs[filled:filled + take] = doc.tokens[a:b]
      targets[filled:filled + take] = doc.targets[a + 1:b + 1]
      mask[filled:filled + take] = doc.mask[a + 1:b + 1]
      seg[filled:filled + take] = segment
      positions[filled:filled + take] = np.arange(take)
      filled += take
      self.offset = b
      if b == pairs:
        row_bytes += doc.num_bytes
        row_docs += 1
        self._advance_doc()
    if self.max_rows and self.rows_made >= self.max_rows and not self.done:
      # The budget ends inside a document: it counts as scored, with the share of its
      # bytes its scored tokens are (rows are separate contexts even in a full pass).
      if self.offset:
        doc = self._cache[(self.epoch, self.pos)]
        row_bytes += doc.num_bytes * self.offset / (len(doc.tokens) - 1)
        row_docs += 1
      self.done = True
    row = {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": positions}
    if self.loss_mask:
      row["loss_mask"] = mask
    if self.with_bytes:
      row["num_bytes"] = np.float32(row_bytes)
      row["num_docs"] = np.int32(row_docs)
    return row

  def _example_row(self, fetch):
    """One example: with a loss mask its (input, next-token target) pairs, cut to the
    row; without, the whole document read (a classifier's, cut to end in EOS), its label."""
    t = self.seq_len
    inputs, targets, seg, positions, mask = (np.zeros(t, np.int32) for _ in range(5))
    label, image, prefix, num_bytes = 0, None, 0, 0
    if not self.done:
      doc = self._doc(fetch)
      tokens, label, image, prefix = doc.tokens, doc.label, doc.image, doc.prefix
      if self.loss_mask:
        n = min(len(tokens) - 1, t)
        inputs[:n], targets[:n], mask[:n] = tokens[:n], doc.targets[1:n + 1], doc.mask[1:n + 1]
      else:
        ids = np.concatenate([tokens[: t - 1], [self.eos_id]]) if len(tokens) > t else tokens
        n = len(ids)
        inputs[:n] = ids
      seg[:n], positions[:n] = 1, np.arange(n)
      num_bytes = doc.num_bytes
      self._advance_doc()
    row = {"inputs": inputs, "segment_ids": seg, "positions": positions}
    if self.loss_mask:
      row["targets"], row["loss_mask"] = targets, mask
    else:
      row["label"] = np.int32(label)
    if self.image:
      row["image"] = np.zeros(self.image, np.uint8) if image is None else image.reshape(self.image)
      row["image_row"] = np.bool_(image is not None)
      row["prefix"] = (np.arange(t) < prefix) & (seg > 0)
    if self.with_bytes:
      row["num_bytes"], row["num_docs"] = np.float32(num_bytes), np.int32(seg[0] > 0)
    return row


class BlockStream:
  """Training rows of one shard: blocks of `block_docs` documents in the epoch's
  seeded order, each packed and its rows emitted in a seeded order."""

  def __init__(self, source, *, shard: int, num_shards: int, seq_len: int, seed: int, bos_id: int, eos_id: int,
               block_docs: int = 128, loss_mask: bool = False):
    self._docs = ShardStream(source, shard=shard, num_shards=num_shards, seq_len=seq_len, seed=seed, bos_id=bos_id,
                             eos_id=eos_id)
    self.shard, self.num_shards, self.seq_len, self.seed = shard, num_shards, seq_len, seed
    self.block_docs, self.loss_mask = block_docs, loss_mask
    self.num_docs = self._docs.num_docs
    self.num_blocks = -(-self.num_docs // block_docs)
    self.epoch = self.block = self.k = 0
    self._blocks: dict[tuple, _Block] = {}
    self.done = False

  def state(self) -> tuple[int, int, int]:
    return self.epoch, self.block, self.k

  def set_state(self, state) -> None:
    self.epoch, self.block, self.k = (int(v) for v in state)
    self._blocks.clear()

  def _keys(self, epoch: int, block: int) -> list[tuple[int, int]]:
    lo = block * self.block_docs
    return [(epoch, pos) for pos in range(lo, min(lo + self.block_docs, self.num_docs))]

  def _next_block_id(self, epoch: int, block: int) -> tuple[int, int]:
    return (epoch, block + 1) if block + 1 < self.num_blocks else (epoch + 1, 0)

  def wanted(self) -> list:
    """(this stream, doc key) pairs the current block, and once it is half used the
    next one, still need: the loader tokenizes them ahead, with every stream's."""
    out = []
    blocks = [(self.epoch, self.block)]
    current = self._blocks.get(blocks[0])
    if current is not None and 2 * self.k >= current.num_rows:
      blocks.append(self._next_block_id(self.epoch, self.block))
    for b in blocks:
      if b not in self._blocks:
        out += [(self._docs, key) for key in self._keys(*b) if key not in self._docs._cache]
    return out

  def _load(self, epoch: int, block: int, fetch) -> "_Block":
    keys = self._keys(epoch, block)
    missing = [k for k in keys if k not in self._docs._cache]
    if missing:
      fetch(self._docs, missing)
    docs = [self._docs._cache.pop(k) for k in keys]
    return _Block([d.tokens for d in docs], [d.mask for d in docs], self.seq_len, [d.targets for d in docs])

  def next_row(self, fetch) -> dict[str, np.ndarray]:
    if self.num_docs == 0:
      raise UserError(f"the split has fewer documents than data.global_batch_size rows (shard {self.shard} is"
                      " empty): use more data or a smaller data.global_batch_size.")
    for b in [b for b in self._blocks if b < (self.epoch, self.block)]:
      del self._blocks[b]
    key = (self.epoch, self.block)
    if key not in self._blocks:
      self._blocks[key] = self._load(*key, fetch)
    nxt = self._next_block_id(*key)
    if nxt not in self._blocks and all(k in self._docs._cache for k in self._keys(*nxt)):
      self._blocks[nxt] = self._load(*nxt, fetch)  # tokenized ahead: pack it now, off the critical path
    block = self._blocks[key]
    order_seed = (self.seed * 1_000_003 + self.shard * 7_919 + self.epoch * 104_729 + self.block * 15_485_863) % (1 << 31)
    r = index_shuffle(self.k, max_index=block.num_rows - 1, seed=order_seed, rounds=4) if block.num_rows > 1 else 0
    row = block.row(r, self.loss_mask)
    self.k += 1
    if self.k == block.num_rows:
      self.epoch, self.block = self._next_block_id(*key)
      self.k = 0
    return row


class _Block:
  """The packed pairs of a block of documents, with row `i` built on demand."""

  def __init__(self, tokens: list, masks: list, seq_len: int, targets: list | None = None):
    self.tokens = np.concatenate(tokens)
    self.targets = self.tokens if targets is None else np.concatenate(targets)
    self.mask = np.concatenate(masks)
    lengths = np.array([len(t) for t in tokens], np.int64)
    doc_starts = np.concatenate([[0], np.cumsum(lengths)])
    self.pair_starts = doc_starts - np.arange(len(lengths) + 1)  # each document has one pair fewer than tokens
    self.num_pairs = int(self.pair_starts[-1])
    self.seq_len = seq_len
    self.num_rows = max(-(-self.num_pairs // seq_len), 1)

  def row(self, i: int, loss_mask: bool) -> dict[str, np.ndarray]:
    t = self.seq_len
    p = i * t + np.arange(t, dtype=np.int64)
    valid = p < self.num_pairs
    p = np.minimum(p, self.num_pairs - 1)
    doc = np.searchsorted(self.pair_starts, p, side="right") - 1
    tok = p + doc
    out = {
        "inputs": np.where(valid, self.tokens[tok], 0).astype(np.int32),
        "targets": np.where(valid, self.targets[tok + 1], 0).astype(np.int32),
        "segment_ids": ((doc - doc[0] + 1) * valid).astype(np.int32),
        "positions": ((p - np.maximum(self.pair_starts[doc], i * t)) * valid).astype(np.int32),
    }
    if loss_mask:
      out["loss_mask"] = (self.mask[tok + 1] * valid).astype(np.int32)
    return out


def _fetcher(source, encoder):
  """fetch(stream, keys): reads and tokenizes the keyed documents of one stream."""
  def fetch(stream, keys):
    supply_many(source, encoder, [(stream, k) for k in keys])
  return fetch


def supply_many(source, encoder, wanted) -> None:
  """Reads and tokenizes the documents of many streams in one batched call."""
  if not wanted:
    return
  indices = [stream.doc_index(*key) for stream, key in wanted]
  keys = [(stream.seed, key[0], index) for (stream, key), index in zip(wanted, indices)]  # seed, epoch, document
  for (stream, key), encoded in zip(wanted, encoder(source.get(indices), keys)):
    stream.supply(key, encoded)


class Loader:
  """This process's rows of every global batch, built ahead in a background thread.

  `get_state()` is the states of this process's streams after the last batch
  returned ([rows, 3]); `set_state(all_rows)` takes the global [G, 3] state.
  """

  def __init__(self, source, encoder, *, seq_len: int, global_batch: int, seed: int, bos_id: int, eos_id: int,
               process_index: int = 0, process_count: int = 1, one_per_row: bool = False, loss_mask: bool = False,
               image: tuple = (), block_docs: int = 128, prefetch: int = 4, lookahead: int = 8):
    if global_batch % process_count:
      raise UserError(f"data.global_batch_size ({global_batch}) must be divisible by the processes ({process_count}).")
    per = global_batch // process_count
    self.rows = range(process_index * per, (process_index + 1) * per)
    self.source, self.encoder = source, encoder
    self.block_docs = 0 if one_per_row else block_docs  # part of what a saved state means
    if image and not one_per_row:
      raise ValueError("rows with images hold one example each: a layout with `image` needs one_per_row")
    if one_per_row:  # examples: each row a new one, in a seeded order per epoch
      self.streams = [ShardStream(source, shard=r, num_shards=global_batch, seq_len=seq_len, seed=seed, bos_id=bos_id,
                                  eos_id=eos_id, one_per_row=True, loss_mask=loss_mask, image=image)
                      for r in self.rows]
    else:
      self.streams = [BlockStream(source, shard=r, num_shards=global_batch, seq_len=seq_len, seed=seed,
                                  bos_id=bos_id, eos_id=eos_id, block_docs=block_docs, loss_mask=loss_mask)
                      for r in self.rows]
    if len(source) < global_batch:
      raise UserError(
          f"the training split has {len(source)} documents, fewer than one global batch of rows"
          f" ({global_batch}): use more data or a smaller data.global_batch_size.")
    self._prefetch, self._lookahead = prefetch, lookahead
    self._fetch = _fetcher(source, encoder)
    self._state = np.array([s.state() for s in self.streams], np.int64)
    self._thread = None

  def _make_batch(self):
    wanted = []
    for s in self.streams:
      wanted += s.wanted() if isinstance(s, BlockStream) else [(s, k) for k in s.upcoming(self._lookahead)]
    supply_many(self.source, self.encoder, wanted)
    rows = [s.next_row(self._fetch) for s in self.streams]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return batch, np.array([s.state() for s in self.streams], np.int64)

  def _run(self, q: queue.Queue, stop: threading.Event):
    try:
      while not stop.is_set():
        item = self._make_batch()
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # handed to the consumer, raised there
      q.put(e)

  def _start(self):
    _LIVE.add(self)
    self._queue, self._stop = queue.Queue(self._prefetch), threading.Event()
    self._thread = threading.Thread(target=self._run, args=(self._queue, self._stop), daemon=True,
                                    name="tpu_lm data")
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._thread is None:
      self._start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._thread = None
      raise item
    batch, self._state = item
    return batch

  def peek(self) -> dict:
    """The next batch, without advancing (to compile for its shapes)."""
    self.close()
    saved = [s.state() for s in self.streams]
    batch, _ = self._make_batch()
    for s, state in zip(self.streams, saved):
      s.set_state(state)
    return batch

  def get_state(self) -> np.ndarray:
    return self._state.copy()

  def set_state(self, all_rows) -> None:
    """The global state ([G, 3], every row's stream); this process takes its rows."""
    self.close()
    all_rows = np.asarray(all_rows, np.int64)
    for stream, r in zip(self.streams, self.rows):
      stream.set_state(all_rows[r])
    self._state = np.array([s.state() for s in self.streams], np.int64)

  def close(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = None


# Loaders still running at exit are stopped first: a daemon thread frozen by the
# interpreter's shutdown inside a C++ call (Grain's shuffle, the tokenizer) aborts
# the process ("terminate called without an active exception").
_LIVE: "weakref.WeakSet[Loader]" = weakref.WeakSet()
atexit.register(lambda: [loader.close() for loader in list(_LIVE)])


EVAL_SEED = 0  # a bounded eval's sample of documents: the same in every eval of every run


def eval_rows(source, encoder, *, seq_len: int, global_batch: int, bos_id: int, eos_id: int, max_batches: int = 0,
              process_index: int = 0, process_count: int = 1, one_per_row: bool = False, loss_mask: bool = False,
              image: tuple = (), on_progress=None):
  """This process's rows of every eval batch: each document once, in order. A pass
  bounded to `max_batches` reads the documents in a fixed seeded order instead (a
  sample that does not depend on the split's order or prefer short documents), packs
  them as the full pass does, and stops after that many batches, inside a document
  if need be. Yields (batch, done), done when this process's streams are exhausted
  (the caller agrees on the end across processes). Rows carry `num_bytes`, the bytes
  of the documents they end (of a document cut by the budget, the share its scored
  tokens are), and `num_docs`, how many. `on_progress(fraction)` hears after each
  batch how far the pass is."""
  per = global_batch // process_count
  streams = [ShardStream(source, shard=r, num_shards=global_batch, seq_len=seq_len, seed=EVAL_SEED, bos_id=bos_id,
                         eos_id=eos_id, shuffle=bool(max_batches), one_pass=True, max_rows=max_batches,
                         one_per_row=one_per_row, loss_mask=loss_mask, with_bytes=not one_per_row or loss_mask,
                         image=image)
             for r in range(process_index * per, (process_index + 1) * per)]
  fetch = _fetcher(source, encoder)
  batches = 0
  while True:
    supply_many(source, encoder, [(s, k) for s in streams for k in s.upcoming(8)])
    rows = [s.next_row(fetch) for s in streams]
    batches += 1
    done = all(s.done for s in streams) or (max_batches and batches >= max_batches)
    if on_progress is not None:
      fraction = sum(s.pos for s in streams) / max(1, sum(s.num_docs for s in streams))
      on_progress(max(fraction, batches / max_batches) if max_batches else fraction)
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, done


def first_tokens(source, encoder, bos_id: int, num: int, length: int) -> np.ndarray:
  """[BOS] + the first tokens of the first `num` documents long enough: sample prompts."""
  prompts = []
  if num <= 0:
    return np.zeros((0, length), np.int32)
  for start in range(0, min(len(source), 64 * max(num, 1)), 64):
    for e in encoder(source.get(range(start, min(start + 64, len(source))))):
      if len(e.ids) + 1 > length:
        prompts.append(np.concatenate([[bos_id], e.ids[: length - 1]]).astype(np.int32))
      if len(prompts) == num:
        return np.stack(prompts)
  return np.stack(prompts) if prompts else np.zeros((0, length), np.int32)
