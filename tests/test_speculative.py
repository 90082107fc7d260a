"""Speculative decoding keeps the target's output: greedy tokens, the sampled
distribution, quantized models, and the caches after rejected proposals."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tpu_lm.errors import UserError
from tpu_lm.inference import speculative
from tpu_lm.inference.decode import Decoder, prefill
from tpu_lm.inference.sampling import Sampling
from tpu_lm.model import quant, transformer

CFG = transformer.ModelConfig(vocab_size=32, num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                              mlp_dim=64, max_len=64, tie_embeddings=False)
VOCAB, EOS, PAD = 24, 2, 0  # the "tokenizer's" vocabulary is smaller than the table, as padded runs' are
_ONES = jnp.zeros((1, 4), jnp.int32)


def _params(seed, scale=4.0):
  params = transformer.Transformer(CFG).init(jax.random.key(seed), _ONES, _ONES + 1, jnp.arange(4)[None])["params"]
  # Random init gives nearly flat logits; sharpen them so the models have opinions.
  return jax.tree.map(lambda x: x * scale if x.ndim > 1 else x, params)


def _noisy(params, seed, noise):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([x + noise * jnp.std(x) * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys)])


def _decoder(params, wrap=None):
  return Decoder(CFG, params, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB, wrap=wrap)


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [[1, *rng.integers(3, VOCAB, int(rng.integers(0, 12)))] for _ in range(n)]


def test_greedy_output_is_the_targets_on_many_prompts():
  target = _params(0)
  prompts = _prompts(24)
  samplings = [Sampling(int(n), 0.0) for n in np.random.default_rng(1).integers(4, 17, len(prompts))]
  alone = _decoder(target).generate(prompts, samplings)
  spec = speculative.SpeculativeDecoder(_decoder(target), _decoder(_noisy(target, 1, 0.2)), 3)
  got = spec.generate(prompts, samplings)
  assert got == alone
  assert any(c.finish_reason == "stop" for c in alone) and any(c.finish_reason == "length" for c in alone)
  # The draft is right often but not always: both accepting and rejecting were exercised.
  assert 0.2 < spec.total.rate < 0.95, spec.total


_prefill = jax.jit(functools.partial(prefill, transformer.Transformer(CFG)), static_argnames="cache_len")


@jax.jit
def _forward_logits(params, tokens_BxT):
  b, t = tokens_BxT.shape
  return transformer.Transformer(CFG).apply({"params": params}, tokens_BxT, jnp.ones_like(tokens_BxT),
                                            jnp.broadcast_to(jnp.arange(t), (b, t)))


def _state(target_params, draft_params, prompts, x_B, cache_len):
  """Prompts (of one length) prefilled into both caches, x_B pending after them."""
  tokens = jnp.asarray(prompts, jnp.int32)
  lengths = jnp.full((len(prompts),), tokens.shape[1], jnp.int32)
  target_cache, _ = _prefill(target_params, tokens, lengths, cache_len=cache_len)
  draft_cache, _ = _prefill(draft_params, tokens, lengths, cache_len=cache_len)
  return (target_cache, draft_cache, tokens[:, -1], jnp.asarray(x_B, jnp.int32), lengths,
          jnp.ones((len(prompts),), jnp.int32))


def _models(k):
  return speculative.Models(transformer.Transformer(CFG), transformer.Transformer(CFG), k, VOCAB, PAD, EOS)


def test_sampled_tokens_follow_the_targets_processed_distribution():
  # A draft that disagrees a lot (another init): always accepting, or resampling from
  # p instead of the residual max(0, p - q), both move the first new token's
  # distribution far beyond what this chi-square test lets through.
  target, draft = _params(0, 2.0), _params(7, 2.0)
  prompt, x, half = [1, 5, 9, 4], 11, 2048
  temperature = np.array([1.0] * half + [0.7] * half, np.float32)
  top_k = np.array([0] * half + [6] * half, np.int32)
  top_p = np.array([1.0] * half + [0.95] * half, np.float32)
  seeds = np.arange(2 * half, dtype=np.uint32)
  round_ = jax.jit(functools.partial(speculative.speculate, m=_models(2), sampler=("sort", 0)))
  state = _state(target, draft, [prompt] * 2 * half, [x] * 2 * half, 16)
  new, n, *_ = round_(target, draft, *state, temperature, top_k, top_p, seeds)
  first = np.asarray(new[:, 0])
  logits_V = _forward_logits(target, jnp.asarray([prompt + [x]]))[0, -1]
  logits_V = jnp.where(jnp.arange(CFG.vocab_size) < VOCAB, logits_V, -jnp.inf)
  for rows in (slice(0, half), slice(half, None)):
    p = np.asarray(speculative._processed(jnp.broadcast_to(logits_V, (1, CFG.vocab_size)), temperature[rows][:1],
                                          top_k[rows][:1], top_p[rows][:1], ("sort", 0))[0], np.float64)
    observed = np.bincount(first[rows], minlength=CFG.vocab_size)
    assert observed[p == 0].sum() == 0  # nothing outside the processed support
    expected = p * half
    big = expected >= 5  # pool the rare tokens into one cell
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
      obs, exp = obs[:-1], exp[:-1]
    exp *= obs.sum() / exp.sum()  # float32 probabilities sum to 1 only to rounding
    assert stats.chisquare(obs, exp).pvalue > 1e-3, (obs, exp)
  rate = float(np.mean(n)) / 2
  assert 0.05 < rate < 0.95, rate  # the rule both accepted and rejected


@pytest.mark.slow  # the greedy equivalence again, int8
def test_a_quantized_target_and_draft_decode_what_the_quantized_target_alone_does():
  spec_ = quant.Spec("int8")
  qmodel = quant.ptq_model(transformer.Transformer(CFG), spec_)
  target = _params(0)
  wrap = functools.partial(quant.ptq_model, spec=spec_)
  q_target = quant.quantize(target, qmodel, spec_)
  q_draft = quant.quantize(_noisy(target, 1, 0.2), qmodel, spec_)
  prompts, sampling = _prompts(8, seed=2), Sampling(10, 0.0)
  alone = _decoder(q_target, wrap).generate(prompts, sampling)
  spec = speculative.SpeculativeDecoder(_decoder(q_target, wrap), _decoder(q_draft, wrap), 4)
  assert spec.generate(prompts, sampling) == alone
  assert spec.total.accepted > 0


@pytest.mark.slow  # the greedy test relies on the same caches; this reads them directly
def test_caches_after_rejected_proposals_continue_as_a_fresh_prefill_would():
  target, draft = _params(0), _noisy(_params(0), 1, 0.3)
  k, rows = 4, 4
  prompts = [[1, 5, 9], [1, 7, 3], [1, 20, 4], [1, 6, 6]]
  x0 = [11, 3, 8, 15]
  target_cache, draft_cache, prev, x, pos, index = _state(target, draft, prompts, x0, 32)
  seqs = [p + [t] for p, t in zip(prompts, x0)]
  greedy = np.zeros(rows, np.float32)
  round_ = jax.jit(functools.partial(speculative.speculate, m=_models(k), sampler=("greedy", 0)))
  rejected = 0
  for _ in range(3):
    new, n, target_cache, draft_cache, _ = round_(target, draft, target_cache, draft_cache, prev, x, pos, index, greedy,
                                               np.zeros(rows, np.int32), np.ones(rows, np.float32),
                                               np.zeros(rows, np.uint32))
    keep = n + 1
    for r in range(rows):
      seqs[r] += [int(t) for t in new[r, : int(keep[r])]]
    rejected += int(jnp.sum(n < k))
    prev, x = speculative.advance(prev, x, new, keep)
    pos, index = pos + keep, index + keep
  assert rejected > 0 and len({len(s) for s in seqs}) > 1  # rows moved apart
  # Feed each pending token through the caches as the next round will; the logits are
  # a fresh forward pass over the sequence kept so far.
  lengths = [len(s) for s in seqs]
  padded = jnp.asarray([s + [PAD] * (32 - len(s)) for s in seqs], jnp.int32)
  step = jax.jit(lambda params, toks, positions, cache: transformer.Transformer(CFG).apply(
      {"params": params}, toks, jnp.ones_like(toks), positions, cache=cache)[0][:, -1])
  for params, cache in ((target, target_cache), (draft, draft_cache)):
    toks = jnp.stack([prev, x], 1)  # as the draft's pass; the target's cache has prev already, rewritten alike
    cached = step(params, toks, pos[:, None] + jnp.arange(-1, 1), cache)
    fresh = _forward_logits(params, padded)[jnp.arange(rows), jnp.asarray(lengths) - 1]
    np.testing.assert_allclose(cached, fresh, rtol=1e-4, atol=1e-4)


def test_bad_settings_are_one_clear_sentence(monkeypatch):
  import types

  from tpu_lm.inference import run_dir

  target = _decoder(_params(0))
  run = types.SimpleNamespace(workdir="/runs/target", tokenizer=types.SimpleNamespace(name="spm2048-aaaa"), decoder=target)
  other = types.SimpleNamespace(workdir="/runs/draft", tokenizer=types.SimpleNamespace(name="bytes"), decoder=target)
  monkeypatch.setattr(run_dir, "load", lambda *args, **kwargs: other)
  with pytest.raises(UserError, match=r"^the draft /runs/draft speaks tokenizer bytes and the target /runs/target speaks"
                                      r" spm2048-aaaa: pass a draft trained with the target's tokenizer"):
    speculative.attach(run, "/runs/draft", 2)
  with pytest.raises(UserError, match="--draft_tokens=0 is invalid: give an integer from 1 to 16"):
    speculative.SpeculativeDecoder(target, target, 0)
  short = Decoder(CFG.__class__(**{**CFG.__dict__, "max_len": 16}), _params(0), eos_id=EOS, pad_id=PAD,
                  vocab_size=VOCAB)
  with pytest.raises(UserError, match="exceeds the draft model's context of 16 tokens"):
    speculative.SpeculativeDecoder(target, short, 2).check(10, Sampling(10))


@pytest.mark.slow  # the greedy equivalence again, through the engine
def test_the_engine_serves_each_sequence_what_the_target_alone_decodes():
  import queue
  import threading
  import types

  from tpu_lm.inference.engine import Engine, Job

  target = _params(0)
  prompts = _prompts(6, seed=3) + [[1]]  # a one-token prompt has nothing to prefill before its pending token
  samplings = [Sampling(int(n), 0.0) for n in np.random.default_rng(4).integers(3, 14, len(prompts))]
  alone = _decoder(target).generate(prompts, samplings)
  slots = speculative.SpeculativeSlots(_decoder(target), _decoder(_noisy(target, 1, 0.2)), 3, slots=4)
  engine = Engine(types.SimpleNamespace(decoder=slots.decoder), max_batch=4, slots=slots)
  # More sequences than slots: later ones join as earlier ones leave, mid-batch.
  jobs = [Job(i, p, s, queue.Queue(), threading.Event(), "r", logprobs=i == 0)
          for i, (p, s) in enumerate(zip(prompts, samplings))]
  engine.submit(jobs)
  try:
    for job, want in zip(jobs, alone):
      events = []
      while not events or events[-1][0] != "done":
        events.append(job.events.get(timeout=120))
      got = events[-1][2]
      assert (got.tokens, got.finish_reason) == (want.tokens, want.finish_reason)
      assert got.speculative["draft_tokens"] == 3 and got.speculative["proposed"] >= got.speculative["accepted"]
      streamed = [e[2] for e in events[:-1]]
      assert streamed[: len(got.tokens)] == got.tokens
      if job.logprobs:  # greedy: the token drawn is the target's likeliest, its log-probability the top one
        assert all(lp[1][0][0] == t and lp[0] == pytest.approx(lp[1][0][1]) for _, _, t, lp in events[:-1])
  finally:
    engine.close(0)
