"""Cached decoding: prefill every prompt in one forward pass, then generate all
new tokens inside one compiled `lax.while_loop`, one token per row per step.

Prompts of different lengths share a batch: each row is right-padded, and its
tokens sit at their own absolute positions in the KV cache, so a row decodes
exactly as it would alone. Each row has its own sampling settings and its own
random stream (derived from its seed and the step), so a request's output does
not depend on what it was batched with. The loop stops when every row has
produced end-of-sequence or its own `max_new_tokens`, or been ended by the caller's
step callback (a stop sequence seen, Ctrl-C).

Shapes are rounded up to powers of two (batch, prompt length, cache length, new
tokens, a top-k bound) so a server meets only a handful of compilations; the
sampler is compiled per kind of batch (greedy, top-k, plain, nucleus), so a
greedy batch sorts nothing and a top-k batch sorts k entries, not the vocabulary.
"""

import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback, multihost_utils

from tpu_lm.errors import UserError
from tpu_lm.inference.sampling import Completion, Sampling, plan, sample_tokens
from tpu_lm.model import params as params_lib
from tpu_lm.model import transformer


def prefill(model, params, tokens_BxP, lengths_B, cache_len: int, images=None, image_rows_B=None):
  """Right-padded prompts through the model into a fresh KV cache of `cache_len`
  positions: (the cache, each prompt's next-token logits [B, V]). Only each prompt's
  last position is unembedded: one [B, V] of logits, not [B, P, V]. `images` (uint8
  [B, H, W, C], a vision model's) fill the first positions of the rows `image_rows_B`
  marks (their prompts hold that many placeholder ids there)."""
  b, p = tokens_BxP.shape
  cache = transformer.init_cache(model.cfg, b, cache_len)
  positions_BxP = jnp.broadcast_to(jnp.arange(p), (b, p))
  prefix_BxP = None
  if model.cfg.attention_mask == "prefix":
    # A prefix LM reads its whole prompt both ways; what it generates is causal. A vision
    # model's row without an image is text, read left to right as its mixed batches train
    # it: BOS alone its prefix (as score.left_to_right reads text).
    ends_B = lengths_B
    if model.cfg.vision is not None:
      with_image_B = image_rows_B if image_rows_B is not None else jnp.full(lengths_B.shape, images is not None)
      ends_B = jnp.where(with_image_B, lengths_B, 1)
    prefix_BxP = positions_BxP < ends_B[:, None]
  variables = {"params": params}
  pictures = {}
  if images is not None:
    from tpu_lm.model.vision import pixels_to_unit

    pictures = {"images": pixels_to_unit(images), "image_rows_B": image_rows_B}
  hidden_BxPxD, cache = model.apply(variables, tokens_BxP, jnp.ones_like(tokens_BxP), positions_BxP, cache=cache,
                                    return_cache=True, method="hidden", prefix_BxT=prefix_BxP, **pictures)
  last_Bx1xD = jnp.take_along_axis(hidden_BxPxD, (lengths_B - 1)[:, None, None], axis=1)
  return cache, model.apply(variables, last_Bx1xD, method="logits")[:, 0]


def _generate(params, tokens_BxP, lengths_B, max_new_B, temperature_B, top_k_B, top_p_B, seeds_B, images, image_rows_B,
              *, model, cache_len: int, max_new: int, eos_id: int, pad_id: int, vocab_size: int, emit,
              sampler: tuple[str, int]):
  b = tokens_BxP.shape[0]
  cache, logits_BxV = prefill(model, params, tokens_BxP, lengths_B, cache_len, images, image_rows_B)
  variables = {"params": params}
  usable_V = jnp.arange(logits_BxV.shape[-1]) < vocab_size  # the model's vocab is padded for sharding

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new) & ~jnp.all(done_B)

  def body(carry):
    i, logits_BxV, cache, out_BxN, done_B, count_B = carry
    logits_BxV = jnp.where(usable_V, logits_BxV, -jnp.inf)
    token_B = sample_tokens(logits_BxV, seeds_B, i, temperature_B, top_k_B, top_p_B, kind=sampler[0],
                            max_top_k=sampler[1])
    token_B = jnp.where(done_B, pad_id, token_B)
    out_BxN = out_BxN.at[:, i].set(token_B)
    count_B = count_B + (~done_B).astype(jnp.int32)
    ended_B = (token_B == eos_id) | (i + 1 >= max_new_B)
    if emit is not None:
      # The host answers which rows it ends here; the next step's tokens depend on that
      # answer, so the callbacks run one at a time, in step order.
      ended_B = ended_B | io_callback(emit, jax.ShapeDtypeStruct((b,), jnp.bool_), i, token_B, done_B)
    done_B = done_B | ended_B
    # Finished rows keep stepping (the batch moves together); clamp their position.
    positions_Bx1 = jnp.minimum(lengths_B + i, cache_len - 1)[:, None]
    hidden_Bx1xD, cache = model.apply(variables, token_B[:, None], jnp.ones_like(token_B[:, None]), positions_Bx1,
                                      cache=cache, return_cache=True, method="hidden")
    # A barrier keeps XLA CPU from fusing the final norm into the unembedding, which
    # at batch 1 turns the library matrix-vector product into a loop 2.5x slower.
    hidden_Bx1xD = jax.lax.optimization_barrier(hidden_Bx1xD)
    logits_BxV = model.apply(variables, hidden_Bx1xD, method="logits")[:, 0]
    return i + 1, logits_BxV, cache, out_BxN, done_B, count_B

  out_BxN = jnp.full((b, max_new), pad_id, jnp.int32)
  carry = (jnp.int32(0), logits_BxV, cache, out_BxN, max_new_B <= 0, jnp.zeros((b,), jnp.int32))
  _, _, _, out_BxN, _, count_B = jax.lax.while_loop(cond, body, carry)
  return out_BxN, count_B  # each row's tokens drawn (padding follows them)


def batch_arrays(prompts, sampling, b: int, p_len: int, pad_id: int):
  """(tokens [b, p_len] right-padded, lengths [b], the per-row sampling fields [b]) of a
  batch of prompts; rows past the prompts are padding (length 1, greedy, 0 new tokens)."""
  tokens = np.full((b, p_len), pad_id, np.int32)
  lengths = np.ones(b, np.int32)
  fields = {"max_new": np.zeros(b, np.int32), "temperature": np.zeros(b, np.float32),
            "top_k": np.zeros(b, np.int32), "top_p": np.ones(b, np.float32), "seed": np.zeros(b, np.uint32)}
  for i, (p, s) in enumerate(zip(prompts, sampling)):
    tokens[i, : len(p)] = p
    lengths[i] = len(p)
    for name, value in (("max_new", s.max_new_tokens), ("temperature", s.temperature),
                        ("top_k", s.top_k), ("top_p", s.top_p), ("seed", s.seed)):
      fields[name][i] = value
  return tokens, lengths, fields


def completions(rows, counts, sampling, eos_id: int) -> list[Completion]:
  """Each row's Completion from its first `count` generated tokens: cut before
  end-of-sequence ("stop"), else "length" at its max_new_tokens, else ended by on_step."""
  results = []
  for row, count, s in zip(rows, counts, sampling):
    row = [int(t) for t in row[:count]]
    if eos_id in row:
      results.append(Completion(row[: row.index(eos_id)], "stop"))
    else:  # fewer than max_new_tokens: on_step ended it
      results.append(Completion(row, "length" if count >= s.max_new_tokens else "stop"))
  return results


def bucket(n: int, minimum: int, cap: int | None = None) -> int:
  """`n` rounded up to a power of two, at least `minimum`, at most `cap`: a shape bucket."""
  size = max(minimum, 1 << (max(n, 1) - 1).bit_length())
  return min(size, cap) if cap else size


class Decoder:
  """Generates from one model's parameters, optionally sharded over a mesh.

  `context` is a callable returning the mesh/logical-rules context the model's
  sharding constraints read (as `train.Setup.context`); `batch_multiple` pads
  the batch to a multiple of the data-parallel size; `wrap(model)`, when given, is the
  model that runs `params` (quantized matmuls, model/quant.py).
  """

  def __init__(self, model_cfg: transformer.ModelConfig, params, *, eos_id: int, pad_id: int, vocab_size: int,
               context: Callable | None = None, batch_multiple: int = 1, wrap: Callable | None = None):
    self.scanned = model_cfg.scan_layers
    self.cfg = dataclasses.replace(model_cfg, scan_layers=False, remat="none", dropout_rate=0.0)
    self.set_params(params)
    self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
    self.max_len = model_cfg.max_len
    self.context = context or (lambda: nn.logical_axis_rules(()))
    self.batch_multiple = batch_multiple
    self._lock = threading.Lock()  # one generate call at a time (the stream target is per call)
    self._on_step, self._rows = None, 0
    self.model = transformer.Transformer(self.cfg)
    self.model = wrap(self.model) if wrap else self.model
    self._fn = jax.jit(
        functools.partial(_generate, model=self.model, eos_id=eos_id, pad_id=pad_id,
                          vocab_size=vocab_size),
        static_argnames=("cache_len", "max_new", "emit", "sampler"),
    )

  def set_params(self, params) -> None:
    """Decode with these parameters from now on (the same shapes: nothing recompiles)."""
    if self.scanned:
      params = params_lib.unstack_layers(params)
    # Decoding reads every weight once per token: keep them in the compute dtype
    # (bfloat16 halves the bytes read); float32 master copies are for training.
    # (run_dir reads them from the checkpoint in that dtype already: no copy then.)
    dtype = jnp.dtype(self.cfg.dtype)
    self.params = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x, params)

  def check(self, prompt_len: int, sampling: Sampling) -> None:
    """Raises UserError when a request's settings are out of range or it cannot fit the model's context."""
    sampling.check()
    if sampling.top_k > self.vocab_size:
      raise UserError(f"top_k={sampling.top_k} is invalid: it must be an integer from 0 to the vocabulary size,"
                      f" {self.vocab_size} (0 keeps every token).")
    if prompt_len < 1:
      raise UserError("the prompt is empty after tokenization: give at least one token.")
    if prompt_len + sampling.max_new_tokens > self.max_len:
      raise UserError(
          f"the prompt ({prompt_len} tokens) plus max_new_tokens ({sampling.max_new_tokens}) exceeds"
          f" the model's context of {self.max_len} tokens: shorten the prompt or ask for fewer tokens."
      )

  def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling | Sequence[Sampling],
               on_step: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
               images: Sequence | None = None) -> list[Completion]:
    """Continues each prompt (token ids, BOS included) and returns its new tokens.

    `on_step(i, tokens[B], finished[B])`, when given, is called from inside the
    compiled loop with the i-th new token of every row (rows finished before
    this step carry padding): that is how tokens are streamed as produced. It may
    return which rows end after this token (a bool, or one per row; None: none),
    e.g. where a stop sequence appeared: their Completion ends there, "stop". Its
    answer gates the next step (a host round trip per step).

    `images` (a vision model's): per prompt, its image (uint8 [H, W, C]) or None; a
    prompt with one starts with the image's placeholder positions (one per patch), which
    the image fills, then BOS.
    """
    if isinstance(sampling, Sampling):
      sampling = [sampling] * len(prompts)
    if len(sampling) != len(prompts) or not prompts:
      raise ValueError("need one Sampling per prompt and at least one prompt")
    for p, s in zip(prompts, sampling):
      self.check(len(p), s)
    n = len(prompts)
    b = bucket(n, self.batch_multiple)
    b += -b % self.batch_multiple
    longest = max(len(p) for p in prompts)
    p_len = bucket(longest, 16, self.max_len)
    max_new = bucket(max(s.max_new_tokens for s in sampling), 16, self.max_len)
    # Powers of two: a server meets log2(context) cache shapes, not context / 128.
    cache_len = bucket(longest + max_new, 128, self.max_len)
    kind, top_k = plan(sampling)
    sampler = (kind, bucket(top_k, 16, self.vocab_size) if kind == "top_k" else 0)

    tokens, lengths, fields = batch_arrays(prompts, sampling, b, p_len, self.pad_id)
    pixels, image_rows = self.image_batch(images, n, b)
    with self._lock, self.context():
      self._on_step, self._rows = on_step, n
      out, counts = self._fn(
          self.params, tokens, lengths, fields["max_new"], fields["temperature"], fields["top_k"],
          fields["top_p"], fields["seed"], pixels, image_rows, cache_len=cache_len, max_new=max_new, sampler=sampler,
          emit=self._emit if on_step else None,
      )
      if not out.is_fully_addressable:  # rows spread over several processes: gather them
        out = multihost_utils.process_allgather(out, tiled=True)
        counts = multihost_utils.process_allgather(counts, tiled=True)
      out, counts = np.asarray(out), np.asarray(counts)
      self._on_step = None
    return completions(out[:n], counts[:n], sampling, self.eos_id)

  def image_batch(self, images, n: int, b: int):
    """(uint8 pixels [b, H, W, C], which rows have an image [b]) for a vision model; (None,
    None) otherwise."""
    v = self.cfg.vision
    if v is None:
      if images is not None and any(i is not None for i in images):
        raise UserError("this model reads no images (it has no vision encoder): send text only.")
      return None, None
    pixels = np.zeros((b, v.image_height, v.image_width, v.channels), np.uint8)
    rows = np.zeros(b, bool)
    for i, image in enumerate(list(images or [])[:n]):
      if image is not None:
        pixels[i], rows[i] = np.asarray(image, np.uint8).reshape(pixels.shape[1:]), True
    return pixels, rows

  def _emit(self, i, tokens_B, done_B):
    ended_B = np.zeros(np.shape(tokens_B), bool)
    if self._on_step is not None:
      n = self._rows
      ended = self._on_step(int(i), np.asarray(tokens_B)[:n], np.asarray(done_B)[:n])
      if ended is not None:
        ended_B[:n] = ended
    return ended_B
