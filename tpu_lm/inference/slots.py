"""Continuous batching, the device side: a KV cache of `rows` slots x `length`
positions that sequences join and leave between steps, and one compiled step that
advances every slot by one token.

A sequence joins by a prefill of its prompt written into a free slot (the slot's
old keys past the prompt are masked by position, so nothing needs clearing); it
leaves by being no longer stepped. Each step samples one token per slot from the
slot's logits with that row's own settings and random stream (its seed and the
index of the token drawn: the same numbers `Decoder.generate` draws, so a request
decodes the same tokens whatever it shares the batch with), feeds it, and keeps the
new logits for the next step.

The cache grows and shrinks in powers of two, in rows (the highest occupied slot)
and positions (the longest prompt + max_new_tokens in flight), so a step over one
short request costs what one short request costs, not what a full batch of long
ones would; it grows at once and shrinks after a sustained lull, each resize
copying the cache once, and the compilations stay a few (log2 of the batch x log2
of the context x the sampler kinds; `warmup` compiles the common ones ahead).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tpu_lm.inference.decode import Decoder, bucket, prefill
from tpu_lm.inference.sampling import Sampling, plan, sample_tokens
from tpu_lm.model import transformer

SHRINK_AFTER = 64  # steps in a row needing a smaller cache before it shrinks
TOP_LOGPROBS = 5  # alternatives reported per token when a row asks for logprobs (OpenAI's maximum)


@dataclasses.dataclass
class Row:
  """One occupied slot as the step sees it."""

  slot: int
  prompt_len: int
  index: int  # the new token this step draws (0: the first after the prompt)
  sampling: Sampling
  logprobs: bool = False


@dataclasses.dataclass
class StepOut:
  tokens: np.ndarray  # [n] one per row, in the order the rows were given
  logprob: np.ndarray | None = None  # [n] the chosen token's log-probability under the model
  top_ids: np.ndarray | None = None  # [n, TOP_LOGPROBS] the most likely tokens, most likely first
  top_logprobs: np.ndarray | None = None  # [n, TOP_LOGPROBS]
  # Speculative decoding (speculative.SpeculativeSlots) draws several tokens a step: then
  # tokens and the fields above gain an axis after the row's ([n, T, ...]), row i's first
  # counts[i] of them are its tokens, and accepted[i] of those were the draft's proposals.
  counts: np.ndarray | None = None
  accepted: np.ndarray | None = None


def _prefill(params, tokens_1xP, lengths_1, images=None, image_rows_1=None, *, model):
  return prefill(model, params, tokens_1xP, lengths_1, tokens_1xP.shape[1], images, image_rows_1)


def _insert(cache, logits_RxV, new_cache, new_logits_1xV, slot_1):
  """Writes a prefilled row into its slot (in place: the cache is donated)."""
  p = new_cache[0]["k"].shape[2]
  cache = [{name: layer[name].at[slot_1, :, :p].set(new[name]) for name in layer} for layer, new in zip(cache, new_cache)]
  return cache, logits_RxV.at[slot_1].set(new_logits_1xV)


def _resize(cache, logits_RxV, *, rows: int, length: int):
  def fit(x, sizes):
    x = x[tuple(slice(0, s) for s in sizes)]
    return jnp.pad(x, [(0, s - d) for s, d in zip(sizes, x.shape)])

  cache = [{name: fit(a, (rows, a.shape[1], length, a.shape[3])) for name, a in layer.items()} for layer in cache]
  return cache, fit(logits_RxV, (rows, logits_RxV.shape[1]))


def _step(params, cache, logits_RxV, positions_R, index_R, temperature_R, top_k_R, top_p_R, seeds_R, *, model,
          vocab_size: int, sampler: tuple[str, int], top_logprobs: int):
  usable_V = jnp.arange(logits_RxV.shape[-1]) < vocab_size  # the model's vocab is padded for sharding
  logits_RxV = jnp.where(usable_V, logits_RxV, -jnp.inf)
  token_R = sample_tokens(logits_RxV, seeds_R, index_R, temperature_R, top_k_R, top_p_R, kind=sampler[0],
                          max_top_k=sampler[1])
  out = {"tokens": token_R}
  if top_logprobs:  # of the model's distribution, before temperature and filtering (as OpenAI reports)
    logprobs_RxV = jax.nn.log_softmax(logits_RxV, axis=-1)
    out["logprob"] = jnp.take_along_axis(logprobs_RxV, token_R[:, None], axis=-1)[:, 0]
    out["top_logprobs"], out["top_ids"] = jax.lax.top_k(logprobs_RxV, top_logprobs)
  variables = {"params": params}
  hidden_Rx1xD, cache = model.apply(variables, token_R[:, None], jnp.ones_like(token_R[:, None]),
                                    positions_R[:, None], cache=cache, return_cache=True, method="hidden")
  hidden_Rx1xD = jax.lax.optimization_barrier(hidden_Rx1xD)  # see decode.py: keeps the unembedding a library matvec
  return out, cache, model.apply(variables, hidden_Rx1xD, method="logits")[:, 0]


def slot_fields(rows: list[Row], slots: int, offset: int = 0) -> dict[str, np.ndarray]:
  """Per slot: the position a step feeds at (the row's prompt + tokens so far, + `offset`),
  the index of the token it draws, and the row's sampling settings; free slots idle
  at position 0."""
  fields = {"position": np.zeros(slots, np.int32), "index": np.zeros(slots, np.int32),
            "temperature": np.zeros(slots, np.float32), "top_k": np.zeros(slots, np.int32),
            "top_p": np.ones(slots, np.float32), "seed": np.zeros(slots, np.uint32)}
  for row in rows:
    s = row.sampling
    for name, value in (("position", row.prompt_len + row.index + offset), ("index", row.index),
                        ("temperature", s.temperature), ("top_k", s.top_k), ("top_p", s.top_p), ("seed", s.seed)):
      fields[name][row.slot] = value
  return fields


class SlotDecoder:
  """The slots of one model (a `Decoder`'s parameters, mesh and limits), at most `slots` rows."""

  def __init__(self, decoder: Decoder, slots: int):
    self.decoder, self.slots = decoder, slots
    self.max_len, self.eos_id = decoder.max_len, decoder.eos_id
    model = decoder.model
    self._prefill = jax.jit(functools.partial(_prefill, model=model))
    self._insert = jax.jit(_insert, donate_argnums=(0, 1))
    self._resize = jax.jit(_resize, static_argnames=("rows", "length"))  # new shapes: nothing to donate to
    self._step = jax.jit(functools.partial(_step, model=model, vocab_size=decoder.vocab_size),
                         static_argnames=("sampler", "top_logprobs"), donate_argnums=(1, 2))
    self.reset()

  def warmup(self, max_prompt: int) -> int:
    """Compiles ahead what a server meets first: the step at every row bucket (greedy
    and plain sampling) and the prefill of every prompt bucket up to `max_prompt`, at
    the shortest cache. Returns the number of shapes compiled."""
    shapes = 0
    length = min(128, self.max_len)
    r = 1
    while True:
      self.fit(r, length)
      for sampling in (Sampling(1, temperature=0.0), Sampling(1, temperature=1.0)):
        self.step([Row(0, 1, 0, sampling)])
        shapes += 1
      if r >= self.slots:
        break
      r *= 2
    p = 16
    while p <= min(max_prompt, length):
      self.prefill(0, [self.decoder.pad_id] * p)
      shapes += 1
      p *= 2
    self.reset()
    return shapes

  def check(self, prompt_len: int, sampling: Sampling) -> None:
    self.decoder.check(prompt_len, sampling)

  def reset(self) -> None:
    """Forgets every slot (after a failed step the donated cache is gone)."""
    self._cache = self._logits = None
    self.shape = (0, 0)  # (rows, length) of the cache
    self._smaller = 0  # steps in a row that needed a smaller cache

  def fit(self, rows: int, length: int) -> None:
    """Makes room for slots 0..rows-1 and `length` positions, in powers of two. It grows
    at once; it shrinks only after SHRINK_AFTER steps in a row that needed less, so a
    load that comes and goes does not copy the cache back and forth."""
    multiple = self.decoder.batch_multiple
    r = bucket(rows, multiple)
    r += -r % multiple
    want = (r, bucket(length, 128, self.max_len))
    if self._cache is not None and want[0] <= self.shape[0] and want[1] <= self.shape[1]:
      self._smaller = self._smaller + 1 if want != self.shape else 0
      if self._smaller < SHRINK_AFTER:
        return
    elif self._cache is not None:  # grow what is short, keep what is long enough
      want = (max(want[0], self.shape[0]), max(want[1], self.shape[1]))
    self._smaller = 0
    with self.decoder.context():
      if self._cache is None:
        cfg = self.decoder.cfg
        self._cache = transformer.init_cache(cfg, *want)
        self._logits = jnp.zeros((want[0], cfg.vocab_size), jnp.float32)
      else:
        self._cache, self._logits = self._resize(self._cache, self._logits, rows=want[0], length=want[1])
    self.shape = want

  def prefill(self, slot: int, ids: list[int], image=None) -> None:
    """Puts a prompt (token ids) into `slot`: its keys and values, and its next-token logits.
    `image` (a vision model's, uint8 [H, W, C]): read in the prompt's first positions.

    One prompt a call: the compilations are one per prompt-length bucket, not one per
    (number arriving together x length), and a batch of prompts costs about the same
    either way, the work being the prompts' tokens.
    """
    p = bucket(len(ids), 16, self.max_len)
    tokens = np.full((1, p), self.decoder.pad_id, np.int32)
    tokens[0, : len(ids)] = ids
    with self.decoder.context():
      pixels, rows = self.decoder.image_batch([image], 1, 1)
      new_cache, new_logits = self._prefill(self.decoder.params, tokens, np.array([len(ids)], np.int32), pixels, rows)
      self._cache, self._logits = self._insert(self._cache, self._logits, new_cache, new_logits,
                                               np.array([slot], np.int32))

  def step(self, rows: list[Row]) -> StepOut:
    """Draws each row's next token (and feeds it); slots without a row idle at position 0."""
    fields = slot_fields(rows, self.shape[0])
    kind, top_k = plan([row.sampling for row in rows])
    sampler = (kind, bucket(top_k, 16, self.decoder.vocab_size) if kind == "top_k" else 0)
    top_logprobs = TOP_LOGPROBS if any(row.logprobs for row in rows) else 0
    with self.decoder.context():
      out, self._cache, self._logits = self._step(
          self.decoder.params, self._cache, self._logits, fields["position"], fields["index"],
          fields["temperature"], fields["top_k"], fields["top_p"], fields["seed"], sampler=sampler,
          top_logprobs=top_logprobs)
    out = {k: np.asarray(v) for k, v in out.items()}
    order = np.array([row.slot for row in rows], np.int64)
    return StepOut(**{k: v[order] for k, v in out.items()})
