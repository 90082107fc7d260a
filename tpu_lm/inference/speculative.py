"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model
proposes k tokens a row, the target scores all k + 1 positions in one forward pass,
and modified rejection sampling keeps exactly what the target alone would sample.

The rule, per row: draft token d_i (drawn from the draft's q_i) is accepted with
probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the row draws from
norm(max(0, p_i - q_i)) instead, and when all k pass it draws a bonus token from the
target's p_{k+1}. p and q are the *processed* distributions (the row's temperature,
top-k and top-p applied to both), so the output is distributed as the target samples
it alone. A greedy row has one-hot p and q: the same rule accepts while the argmaxes
agree, then takes the target's argmax.

Undoing a rejection costs nothing: the KV caches are masked by position (a query
sees the slots up to its own position, kernels.cached_attention), so a row's rejected
keys lie past its position, unseen, until the next round overwrites them. Rows keep
their own positions, so each accepts its own number of tokens and the batch steps on.

Between rounds a row holds its pending token x (emitted, fed to neither model) at
position pos, and the token before it. The target's cache covers every position
before pos; the draft's, every position before pos - 1 (after a round that accepts
all k, the draft never fed its last proposal). So each round's first draft pass feeds
two tokens, the one at pos - 1 (where it was cached already, the same keys again)
and x.
"""

import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback, multihost_utils

from tpu_lm.errors import UserError
from tpu_lm.inference import slots as slots_lib
from tpu_lm.inference.decode import Decoder, batch_arrays, bucket, completions, prefill
from tpu_lm.inference.sampling import Completion, Sampling, filtered_logits, plan, sample_tokens
from tpu_lm.model import transformer

MAX_DRAFT_TOKENS = 16  # past this the draft's run of luck is long gone, and each round's work only grows
DRAFT, ACCEPT, RESIDUAL = 1, 2, 3  # what a row's random numbers at one token index are for


def _keys(seeds_B, index_B, purpose: int):
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), i), purpose))(seeds_B, index_B)


def _processed(logits_BxV, temperature_B, top_k_B, top_p_B, sampler):
  """Each row's processed distribution [B, V]: one-hot at the argmax for a greedy row."""
  onehot_BxV = jax.nn.one_hot(jnp.argmax(logits_BxV, axis=-1), logits_BxV.shape[-1], dtype=jnp.float32)
  probs_BxV = jax.nn.softmax(filtered_logits(logits_BxV, temperature_B, top_k_B, top_p_B, kind=sampler[0],
                                             max_top_k=sampler[1]), axis=-1)
  return jnp.where((temperature_B == 0)[:, None], onehot_BxV, probs_BxV)


@dataclasses.dataclass(frozen=True)
class Models:
  """What a round takes besides arrays: the two models and the tokenizer's numbers."""

  target: object
  draft: object
  k: int
  vocab_size: int  # the tokenizer's: the models' tables are padded past it
  pad_id: int
  eos_id: int


def speculate(target_params, draft_params, target_cache, draft_cache, prev_B, x_B, pos_B, index_B, temperature_B,
              top_k_B, top_p_B, seeds_B, *, m: Models, sampler: tuple[str, int]):
  """One round for every row: k draft proposals, one target pass over k + 1 positions,
  the acceptance rule. `x_B` is each row's pending token, at `pos_B`; `prev_B` the one
  before it; `index_B` the number of the row's next new token (its random stream);
  `sampler`: sampling.plan's kind and top-k bound.

  Returns (new_BxK1, n_B, target_cache, draft_cache, logits_BxK1xV): row r's new tokens
  are new_BxK1[r, :n_B[r] + 1] (its n accepted proposals, then the target's correction
  or bonus token; padding after), and logits_BxK1xV[r, j] are the target's logits that
  new token j was judged by. Neither cache is rolled back here: positions do that (see
  the module)."""
  b, k = x_B.shape[0], m.k
  cache_len = target_cache[0]["k"].shape[2]
  greedy = sampler[0] == "greedy"
  settings = (temperature_B, top_k_B, top_p_B)
  at = functools.partial(jnp.minimum, cache_len - 1)  # finished rows step on; keep them inside the cache

  def logits(model, params, tokens_BxT, positions_BxT, cache):
    hidden_BxTxD, cache = model.apply({"params": params}, tokens_BxT, jnp.ones_like(tokens_BxT), positions_BxT,
                                      cache=cache, return_cache=True, method="hidden")
    hidden_BxTxD = jax.lax.optimization_barrier(hidden_BxTxD)  # see decode.py: keeps the unembedding a library matvec
    logits_BxTxV = model.apply({"params": params}, hidden_BxTxD, method="logits")
    usable_V = jnp.arange(logits_BxTxV.shape[-1]) < m.vocab_size
    return jnp.where(usable_V, logits_BxTxV, -jnp.inf), cache

  def propose(j, logits_BxV):
    if greedy:
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), jnp.zeros((b, 0), jnp.float32)
    q_BxV = _processed(logits_BxV, *settings, sampler)
    d_B = jax.vmap(jax.random.categorical)(_keys(seeds_B, index_B + j, DRAFT), jnp.log(q_BxV))
    return d_B.astype(jnp.int32), q_BxV

  def draft_step(carry, j):
    logits_BxV, cache = carry
    d_B, q_BxV = propose(j, logits_BxV)
    logits_Bx1xV, cache = logits(m.draft, draft_params, d_B[:, None], at(pos_B + 1 + j)[:, None], cache)
    return (logits_Bx1xV[:, 0], cache), (d_B, q_BxV)

  tokens_Bx2 = jnp.stack([prev_B, x_B], axis=1)
  logits_Bx2xV, draft_cache = logits(m.draft, draft_params, tokens_Bx2, at(pos_B[:, None] + jnp.arange(-1, 1)),
                                     draft_cache)
  (logits_BxV, draft_cache), (d_KxB, q_KxBxV) = jax.lax.scan(draft_step, (logits_Bx2xV[:, 1], draft_cache),
                                                              jnp.arange(k - 1))
  d_B, q_BxV = propose(k - 1, logits_BxV)
  drafts_BxK = jnp.concatenate([d_KxB.T, d_B[:, None]], axis=1)

  tokens_BxK1 = jnp.concatenate([x_B[:, None], drafts_BxK], axis=1)
  logits_BxK1xV, target_cache = logits(m.target, target_params, tokens_BxK1,
                                       at(pos_B[:, None] + jnp.arange(k + 1)), target_cache)
  if greedy:
    best_BxK1 = jnp.argmax(logits_BxK1xV, axis=-1).astype(jnp.int32)
    n_B = jnp.sum(jnp.cumprod(drafts_BxK == best_BxK1[:, :k], axis=1), axis=1)
    y_B = jnp.take_along_axis(best_BxK1, n_B[:, None], axis=1)[:, 0]
  else:
    v = logits_BxK1xV.shape[-1]
    p_BxK1xV = _processed(logits_BxK1xV.reshape(b * (k + 1), v),
                          *(jnp.repeat(s, k + 1) for s in settings), sampler).reshape(b, k + 1, v)
    q_BxKxV = jnp.concatenate([jnp.swapaxes(q_KxBxV, 0, 1), q_BxV[:, None]], axis=1)
    p_d_BxK = jnp.take_along_axis(p_BxK1xV[:, :k], drafts_BxK[..., None], axis=-1)[..., 0]
    q_d_BxK = jnp.take_along_axis(q_BxKxV, drafts_BxK[..., None], axis=-1)[..., 0]
    u_BxK = jax.vmap(lambda j: jax.vmap(jax.random.uniform)(_keys(seeds_B, index_B + j, ACCEPT)), out_axes=1)(
        jnp.arange(k))
    # u < p/q, multiplied out: no division by a q that rounds to 0.
    n_B = jnp.sum(jnp.cumprod(u_BxK * q_d_BxK < p_d_BxK, axis=1), axis=1)
    # At the first rejection: the residual max(0, p - q); after k acceptances: p_{k+1}.
    residual_BxK1xV = jnp.concatenate([jnp.maximum(p_BxK1xV[:, :k] - q_BxKxV, 0), p_BxK1xV[:, k:]], axis=1)
    r_BxV = jnp.take_along_axis(residual_BxK1xV, n_B[:, None, None], axis=1)[:, 0]
    p_BxV = jnp.take_along_axis(p_BxK1xV, n_B[:, None, None], axis=1)[:, 0]
    # An all-zero residual means p == q there, where rejecting had probability 0 (up to rounding).
    r_BxV = jnp.where(jnp.sum(r_BxV, axis=-1, keepdims=True) > 0, r_BxV, p_BxV)
    y_B = jax.vmap(jax.random.categorical)(_keys(seeds_B, index_B + n_B, RESIDUAL), jnp.log(r_BxV))
  j_K1 = jnp.arange(k + 1)
  padded_BxK1 = jnp.concatenate([drafts_BxK, jnp.zeros((b, 1), jnp.int32)], axis=1)
  new_BxK1 = jnp.where(j_K1 < n_B[:, None], padded_BxK1,
                       jnp.where(j_K1 == n_B[:, None], y_B[:, None].astype(jnp.int32), m.pad_id))
  return new_BxK1, n_B.astype(jnp.int32), target_cache, draft_cache, logits_BxK1xV


def advance(prev_B, x_B, new_BxK1, keep_B):
  """(prev, x) after a row keeps the first keep_B of its new tokens (0: unchanged)."""
  seq_BxK2 = jnp.concatenate([prev_B[:, None], x_B[:, None], new_BxK1], axis=1)
  return (jnp.take_along_axis(seq_BxK2, keep_B[:, None], axis=1)[:, 0],
          jnp.take_along_axis(seq_BxK2, keep_B[:, None] + 1, axis=1)[:, 0])


def _generate(target_params, draft_params, tokens_BxP, lengths_B, max_new_B, temperature_B, top_k_B, top_p_B, seeds_B,
              *, m: Models, sampler: tuple[str, int], cache_len: int, max_new: int, emit):
  b = tokens_BxP.shape[0]
  target_cache, logits_BxV = prefill(m.target, target_params, tokens_BxP, lengths_B, cache_len)
  draft_cache, _ = prefill(m.draft, draft_params, tokens_BxP, lengths_B, cache_len)
  rows_B = jnp.arange(b)
  # The first token is the target's own draw (as Decoder draws it): the rounds need a pending token.
  logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < m.vocab_size, logits_BxV, -jnp.inf)
  x_B = sample_tokens(logits_BxV, seeds_B, 0, temperature_B, top_k_B, top_p_B, kind=sampler[0],
                      max_top_k=sampler[1])
  done_B = max_new_B <= 0
  keep_B = (~done_B).astype(jnp.int32)
  if emit is not None:
    keep_B = io_callback(emit, jax.ShapeDtypeStruct((b,), jnp.int32), x_B[:, None], keep_B)
  out_BxN = jnp.full((b, max_new), m.pad_id, jnp.int32).at[:, 0].set(jnp.where(keep_B > 0, x_B, m.pad_id))
  done_B = done_B | (keep_B == 0) | (x_B == m.eos_id) | (max_new_B <= 1)
  prev_B = tokens_BxP[rows_B, lengths_B - 1]
  zeros_B = jnp.zeros((b,), jnp.int32)

  def cond(carry):
    return ~jnp.all(carry[5])

  def body(carry):
    target_cache, draft_cache, prev_B, x_B, out_BxN, done_B, count_B, accepted_B, proposed_B = carry
    new_BxK1, n_B, target_cache, draft_cache, _ = speculate(
        target_params, draft_params, target_cache, draft_cache, prev_B, x_B, lengths_B + count_B - 1, count_B,
        temperature_B, top_k_B, top_p_B, seeds_B, m=m, sampler=sampler)
    j_K1 = jnp.arange(m.k + 1)
    eos_BxK1 = (new_BxK1 == m.eos_id) & (j_K1 <= n_B[:, None])
    upto_eos_B = jnp.where(jnp.any(eos_BxK1, axis=1), jnp.argmax(eos_BxK1, axis=1) + 1, m.k + 1)
    keep_B = jnp.minimum(jnp.minimum(n_B + 1, upto_eos_B), max_new_B - count_B)
    keep_B = jnp.where(done_B, 0, keep_B)
    if emit is not None:
      # The host may end rows earlier (a stop sequence, Ctrl-C); the next round depends on its answer.
      keep_B = io_callback(emit, jax.ShapeDtypeStruct((b,), jnp.int32), new_BxK1, keep_B)
    ended_B = ((keep_B < n_B + 1) | jnp.any(eos_BxK1 & (j_K1 < keep_B[:, None]), axis=1)
               | (count_B + keep_B >= max_new_B))
    column_BxK1 = jnp.where(j_K1 < keep_B[:, None], count_B[:, None] + j_K1, max_new)  # max_new: dropped
    out_BxN = out_BxN.at[rows_B[:, None], column_BxK1].set(new_BxK1, mode="drop")
    active_B = (~done_B).astype(jnp.int32)
    accepted_B, proposed_B = accepted_B + active_B * n_B, proposed_B + active_B * m.k
    prev_B, x_B = advance(prev_B, x_B, new_BxK1, keep_B)
    return (target_cache, draft_cache, prev_B, x_B, out_BxN, done_B | ended_B, count_B + keep_B, accepted_B,
            proposed_B)

  carry = (target_cache, draft_cache, prev_B, x_B, out_BxN, done_B, keep_B, zeros_B, zeros_B)
  *_, out_BxN, _, count_B, accepted_B, proposed_B = jax.lax.while_loop(cond, body, carry)
  return out_BxN, count_B, accepted_B, proposed_B


@dataclasses.dataclass
class Acceptance:
  """Draft tokens accepted of those proposed (a row's, a call's, or a session's)."""

  accepted: int = 0
  proposed: int = 0

  @property
  def rate(self) -> float:
    return self.accepted / self.proposed if self.proposed else 0.0

  def __add__(self, other: "Acceptance") -> "Acceptance":
    return Acceptance(self.accepted + other.accepted, self.proposed + other.proposed)


class SpeculativeDecoder:
  """A target `Decoder` sped up by a draft `Decoder`'s proposals, `k` a round: the same
  `check`/`generate` as the target's, the same distribution of text. `last` holds the
  acceptance of each row of the latest call; `total`, of every call so far."""

  def __init__(self, target: Decoder, draft: Decoder, k: int):
    if not (isinstance(k, int) and 1 <= k <= MAX_DRAFT_TOKENS):
      raise UserError(f"--draft_tokens={k} is invalid: give an integer from 1 to {MAX_DRAFT_TOKENS}.")
    if draft.vocab_size != target.vocab_size:
      raise UserError(f"the draft model's vocabulary ({draft.vocab_size} tokens) is not the target's"
                      f" ({target.vocab_size}): pass a draft run trained with the target's tokenizer.")
    self.target, self.draft, self.k = target, draft, k
    self.eos_id, self.pad_id, self.vocab_size = target.eos_id, target.pad_id, target.vocab_size
    self.max_len = min(target.max_len, draft.max_len)
    self.last: list[Acceptance] = []
    self.total = Acceptance()
    self._lock = threading.Lock()
    self._on_step, self._rows, self._step = None, 0, 0
    models = Models(target.model, draft.model, k, self.vocab_size, self.pad_id, self.eos_id)
    self._fn = jax.jit(functools.partial(_generate, m=models), static_argnames=("sampler", "cache_len", "max_new", "emit"))

  def check(self, prompt_len: int, sampling: Sampling) -> None:
    """Raises UserError when a request does not fit the target, or the draft's context."""
    self.target.check(prompt_len, sampling)
    if prompt_len + sampling.max_new_tokens > self.draft.max_len:
      raise UserError(
          f"the prompt ({prompt_len} tokens) plus max_new_tokens ({sampling.max_new_tokens}) exceeds the draft"
          f" model's context of {self.draft.max_len} tokens: shorten the prompt, ask for fewer tokens or pass a"
          " draft with a longer context.")

  def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling | Sequence[Sampling],
               on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> list[Completion]:
    """As `Decoder.generate`. `on_step` is called once per new token index, as there,
    but a round's tokens arrive together (a row that has no token at an index is
    marked finished for that call)."""
    if isinstance(sampling, Sampling):
      sampling = [sampling] * len(prompts)
    if len(sampling) != len(prompts) or not prompts:
      raise ValueError("need one Sampling per prompt and at least one prompt")
    for p, s in zip(prompts, sampling):
      self.check(len(p), s)
    n = len(prompts)
    multiple = self.target.batch_multiple
    b = bucket(n, multiple)
    b += -b % multiple
    longest = max(len(p) for p in prompts)
    p_len = bucket(longest, 16, self.max_len)
    max_new = bucket(max(s.max_new_tokens for s in sampling), 16, self.max_len)
    # A round writes k + 1 positions past a row's last; positions past the cache are
    # clamped into its last slot, which no kept token reads.
    cache_len = bucket(longest + max_new + self.k + 1, 128, self.max_len)
    kind, top_k = plan(sampling)
    sampler = (kind, bucket(top_k, 16, self.vocab_size) if kind == "top_k" else 0)

    tokens, lengths, fields = batch_arrays(prompts, sampling, b, p_len, self.pad_id)
    with self._lock, self.target.context():
      self._on_step, self._rows, self._step = on_step, n, 0
      outs = self._fn(
          self.target.params, self.draft.params, tokens, lengths, fields["max_new"], fields["temperature"],
          fields["top_k"], fields["top_p"], fields["seed"], sampler=sampler, cache_len=cache_len, max_new=max_new,
          emit=self._emit if on_step else None)
      if not outs[0].is_fully_addressable:  # rows spread over several processes: gather them
        outs = [multihost_utils.process_allgather(x, tiled=True) for x in outs]
      out, counts, accepted, proposed = (np.asarray(x) for x in outs)
      self._on_step = None
    self.last = [Acceptance(int(a), int(p)) for a, p in zip(accepted[:n], proposed[:n])]
    for a in self.last:
      self.total = self.total + a
    return completions(out[:n], counts[:n], sampling, self.eos_id)

  def _emit(self, tokens_BxT, keep_B):
    """Hands on_step each row's kept tokens one index at a time; returns how many each
    row keeps (fewer where on_step ended it)."""
    tokens_BxT, keep_B = np.asarray(tokens_BxT), np.array(keep_B, np.int32)
    n = self._rows
    for j in range(int(keep_B[:n].max(initial=0))):
      live = j < keep_B[:n]
      ended = self._on_step(self._step, np.where(live, tokens_BxT[:n, j], self.pad_id), ~live)
      self._step += 1
      if ended is not None:
        keep_B[:n] = np.where(np.broadcast_to(np.asarray(ended, bool), (n,)) & live, j + 1, keep_B[:n])
    return keep_B


def _slot_step(target_params, draft_params, target_cache, draft_cache, prev_R, x_R, pos_R, index_R, temperature_R,
               top_k_R, top_p_R, seeds_R, *, m: Models, sampler: tuple[str, int], top_logprobs: int):
  new_RxK1, n_R, target_cache, draft_cache, logits_RxK1xV = speculate(
      target_params, draft_params, target_cache, draft_cache, prev_R, x_R, pos_R, index_R, temperature_R, top_k_R,
      top_p_R, seeds_R, m=m, sampler=sampler)
  out = {"tokens": new_RxK1, "accepted": n_R}
  if top_logprobs:  # of the target's distribution, before temperature and filtering (as slots.py reports)
    logprobs_RxK1xV = jax.nn.log_softmax(logits_RxK1xV, axis=-1)
    out["logprob"] = jnp.take_along_axis(logprobs_RxK1xV, new_RxK1[..., None], axis=-1)[..., 0]
    out["top_logprobs"], out["top_ids"] = jax.lax.top_k(logprobs_RxK1xV, top_logprobs)
  return out, target_cache, draft_cache


def _insert(cache, new_cache, slot_1):
  p = new_cache[0]["k"].shape[2]
  return [{name: layer[name].at[slot_1, :, :p].set(new[name]) for name in layer} for layer, new in zip(cache, new_cache)]


class SpeculativeSlots(slots_lib.SlotDecoder):
  """Continuous batching with a draft (slots.SlotDecoder's interface, for the engine):
  each step is one speculative round for every occupied slot, so each sequence gets
  1 to k + 1 tokens a step, by its own acceptance, while the batch steps on together.

  A sequence joins with its prompt but the last token prefilled into both caches, the
  last token pending (the round's first draft pass feeds it): so its first token, too,
  is speculated. The pending token and the one before it live here, per slot."""

  def __init__(self, target: Decoder, draft: Decoder, k: int, slots: int):
    self.spec = SpeculativeDecoder(target, draft, k)  # checks k and the vocabularies
    if "prefix" in (target.cfg.attention_mask, draft.cfg.attention_mask):
      # Its prompt's last token would be fed after the prefill, outside the both-ways prefix.
      raise UserError("serving a prefix-LM run with a draft model is not supported: serve it without"
                      " --draft_workdir (generate --draft_workdir works).")
    self.decoder, self.draft, self.k, self.slots = target, draft, k, slots
    self.max_len, self.eos_id = self.spec.max_len, target.eos_id
    models = Models(target.model, draft.model, k, target.vocab_size, target.pad_id, target.eos_id)
    self._prefill = jax.jit(functools.partial(slots_lib._prefill, model=target.model))
    self._prefill_draft = jax.jit(functools.partial(slots_lib._prefill, model=draft.model))
    self._insert = jax.jit(_insert, donate_argnums=(0,))
    self._step = jax.jit(functools.partial(_slot_step, m=models), static_argnames=("sampler", "top_logprobs"),
                         donate_argnums=(2, 3))
    self.reset()

  def check(self, prompt_len: int, sampling: Sampling) -> None:
    self.spec.check(prompt_len, sampling)

  def reset(self) -> None:
    self._cache = self._draft_cache = None
    self._prev = self._x = np.zeros(0, np.int32)
    self.shape = (0, 0)
    self._smaller = 0

  def fit(self, rows: int, length: int) -> None:
    """As SlotDecoder.fit, with room for the k + 1 positions a round writes past a row's last."""
    r = bucket(rows, self.decoder.batch_multiple)
    r += -r % self.decoder.batch_multiple
    want = (r, bucket(length + self.k + 1, 128, self.max_len))
    if self._cache is not None and want[0] <= self.shape[0] and want[1] <= self.shape[1]:
      self._smaller = self._smaller + 1 if want != self.shape else 0
      if self._smaller < slots_lib.SHRINK_AFTER:
        return
    elif self._cache is not None:
      want = (max(want[0], self.shape[0]), max(want[1], self.shape[1]))
    self._smaller = 0
    with self.decoder.context():
      caches = []
      for decoder, cache in ((self.decoder, self._cache), (self.draft, self._draft_cache)):
        if cache is None:
          caches.append(transformer.init_cache(decoder.cfg, *want))
        else:
          caches.append([{name: _fit(a, (want[0], a.shape[1], want[1], a.shape[3])) for name, a in layer.items()}
                         for layer in cache])
      self._cache, self._draft_cache = caches
    self._prev, self._x = (np.pad(a[: want[0]], (0, max(0, want[0] - len(a)))) for a in (self._prev, self._x))
    self.shape = want

  def prefill(self, slot: int, ids: list[int], image=None) -> None:
    if image is not None:  # attach() refuses prefix-LM models, as every model that reads images is
      raise ValueError("speculative decoding reads no images")
    self._x[slot], self._prev[slot] = ids[-1], ids[-2] if len(ids) > 1 else ids[-1]
    if len(ids) == 1:  # nothing before the pending token; the slot's old keys lie at or past it
      return
    p = bucket(len(ids) - 1, 16, self.max_len)
    tokens = np.full((1, p), self.decoder.pad_id, np.int32)
    tokens[0, : len(ids) - 1] = ids[:-1]
    lengths = np.array([len(ids) - 1], np.int32)
    slot_1 = np.array([slot], np.int32)
    with self.decoder.context():
      new_cache, _ = self._prefill(self.decoder.params, tokens, lengths)
      self._cache = self._insert(self._cache, new_cache, slot_1)
      new_cache, _ = self._prefill_draft(self.draft.params, tokens, lengths)
      self._draft_cache = self._insert(self._draft_cache, new_cache, slot_1)

  def step(self, rows: list[slots_lib.Row]) -> slots_lib.StepOut:
    """One round for every occupied slot; slots without a row idle at position 0."""
    # A round starts at the row's pending token, one before where a plain step feeds.
    fields = slots_lib.slot_fields(rows, self.shape[0], offset=-1)
    kind, top_k = plan([row.sampling for row in rows])
    sampler = (kind, bucket(top_k, 16, self.decoder.vocab_size) if kind == "top_k" else 0)
    top_logprobs = slots_lib.TOP_LOGPROBS if any(row.logprobs for row in rows) else 0
    with self.decoder.context():
      out, self._cache, self._draft_cache = self._step(
          self.decoder.params, self.draft.params, self._cache, self._draft_cache, self._prev, self._x,
          fields["position"], fields["index"], fields["temperature"], fields["top_k"], fields["top_p"],
          fields["seed"], sampler=sampler, top_logprobs=top_logprobs)
    out = {k: np.asarray(v) for k, v in out.items()}
    n_R = out["accepted"]
    new_RxK1 = out["tokens"]
    seq_RxK2 = np.concatenate([self._x[:, None], new_RxK1], axis=1)
    at_R = np.arange(self.shape[0])
    self._prev, self._x = seq_RxK2[at_R, n_R].astype(np.int32), seq_RxK2[at_R, n_R + 1].astype(np.int32)
    order = np.array([row.slot for row in rows], np.int64)
    return slots_lib.StepOut(**{k: v[order] for k, v in out.items()}, counts=n_R[order] + 1)


def _fit(x, sizes):
  x = x[tuple(slice(0, s) for s in sizes)]
  return jnp.pad(x, [(0, s - d) for s, d in zip(sizes, x.shape)])


def attach(run, draft_workdir: str, k: int, *, step: int | None = None, tensor_parallel: int = 1) -> SpeculativeDecoder:
  """`run`'s decoder sped up by the run directory `draft_workdir` (any run that speaks
  the same tokenizer, e.g. a distilled student) proposing `k` tokens a round."""
  from tpu_lm.inference import run_dir

  if not (isinstance(k, int) and 1 <= k <= MAX_DRAFT_TOKENS):  # before loading anything
    raise UserError(f"--draft_tokens={k} is invalid: give an integer from 1 to {MAX_DRAFT_TOKENS}.")
  draft = run_dir.load(draft_workdir, step=step, tensor_parallel=tensor_parallel)
  if draft.tokenizer.name != run.tokenizer.name:
    raise UserError(f"the draft {draft.workdir} speaks tokenizer {draft.tokenizer.name} and the target {run.workdir}"
                    f" speaks {run.tokenizer.name}: pass a draft trained with the target's tokenizer"
                    " (e.g. distilled from it with configs/distill.py).")
  return SpeculativeDecoder(run.decoder, draft.decoder, k)
