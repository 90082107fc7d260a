"""Cached decoding against the full forward pass, batching, sampling and sharded decode."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from tpu_lm.config import derived
from tpu_lm.inference import decode
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training.setup import Setup
from tpu_lm.model import transformer

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, num_kv_heads=2, tie_embeddings=False)
# The speedrun's model choices (docs/training.md "Recipe") on the Llama block.
RECIPE = LLAMA | dict(mlp="relu2", qk_norm=True, logit_softcap=3.0)
VOCAB = 259  # the byte tokenizer's; the model's is padded to 384
EOS = 2


def _model(family, seed=0, **overrides):
  cfg = dataclasses.replace(derived.model_config(tiny_config()), **family, **overrides)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = transformer.Transformer(cfg).init(jax.random.key(seed), tokens, tokens + 1, jnp.arange(8)[None])["params"]
  # Random init gives nearly flat logits; sharpen them so greedy choices are clear-cut.
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
  return cfg, params


def _full_logits(cfg, params, tokens_BxT):
  def forward(params, tokens_BxT):
    b, t = tokens_BxT.shape
    return transformer.Transformer(cfg).apply(
        {"params": params}, tokens_BxT, jnp.ones_like(tokens_BxT), jnp.broadcast_to(jnp.arange(t), (b, t))
    )

  return jax.jit(forward)(params, jnp.asarray(tokens_BxT))


def _prompts():
  rng = np.random.default_rng(0)
  return [[1, *rng.integers(3, VOCAB, n)] for n in (5, 11, 2)]


@pytest.mark.parametrize("family", [{}, LLAMA, RECIPE], ids=["gpt2", "llama_gqa", "recipe"])
def test_cached_logits_equal_the_full_forward_pass_at_every_position(family):
  cfg, params = _model(family)
  model = transformer.Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, VOCAB, (2, 20)), jnp.int32)
  full = _full_logits(cfg, params, tokens)
  # Row 0 prefills 7 tokens, row 1 only 4 (right-padded): each then feeds its
  # remaining tokens one at a time through the cache.
  lengths = np.array([7, 4])
  prefill = jnp.where(jnp.arange(7)[None] < lengths[:, None], tokens[:, :7], 0)
  step = jax.jit(lambda tok, pos, cache: model.apply({"params": params}, tok, jnp.ones_like(tok), pos, cache=cache))
  logits, cache = step(prefill, jnp.broadcast_to(jnp.arange(7), (2, 7)), transformer.init_cache(cfg, 2, 32))
  for row in range(2):
    np.testing.assert_allclose(logits[row, : lengths[row]], full[row, : lengths[row]], rtol=1e-4, atol=1e-4)
  step = jax.jit(lambda tok, pos, cache: model.apply({"params": params}, tok, jnp.ones_like(tok), pos, cache=cache))
  for i in range(13):
    pos = jnp.asarray(lengths + i)[:, None]
    tok = jnp.take_along_axis(tokens, pos, axis=1)
    logits, cache = step(tok, pos, cache)
    for row in range(2):
      np.testing.assert_allclose(logits[row, 0], full[row, lengths[row] + i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [{}, LLAMA], ids=["gpt2", "llama_gqa"])
def test_greedy_decoding_equals_repeated_argmax_of_the_full_forward_pass(family):
  cfg, params = _model(family)
  decoder = decode.Decoder(cfg, params, eos_id=-1, pad_id=0, vocab_size=VOCAB)
  prompt = _prompts()[0]
  [got] = decoder.generate([prompt], decode.Sampling(max_new_tokens=10, temperature=0))
  # A fixed-length buffer (causal attention ignores what follows) keeps this to one compile.
  seq = np.zeros(len(prompt) + 10, np.int32)
  seq[: len(prompt)] = prompt
  forward = jax.jit(lambda p, t: transformer.Transformer(cfg).apply(
      {"params": p}, t, jnp.ones_like(t), jnp.arange(t.shape[1])[None]))
  for n in range(len(prompt), len(seq)):
    seq[n] = int(jnp.argmax(forward(params, seq[None])[0, n - 1, :VOCAB]))
  seq = seq.tolist()
  assert got.tokens == seq[len(prompt):]
  assert got.finish_reason == "length"


@pytest.fixture(scope="module")
def gpt2():
  return _model({})


def test_prompts_batched_together_give_what_each_gives_alone(gpt2):
  cfg, params = gpt2
  decoder = decode.Decoder(cfg, params, eos_id=-1, pad_id=0, vocab_size=VOCAB)
  samplings = [decode.Sampling(9, 0.0), decode.Sampling(12, 1.0, top_k=20, seed=3),
               decode.Sampling(6, 0.8, top_p=0.9, seed=4)]
  together = decoder.generate(_prompts(), samplings)
  alone = [decoder.generate([p], s)[0] for p, s in zip(_prompts(), samplings)]
  assert together == alone
  assert [len(c.tokens) for c in together] == [9, 12, 6]  # each row's own limit


def test_a_row_stops_at_end_of_sequence_and_the_others_go_on(gpt2):
  cfg, params = gpt2
  greedy = decode.Sampling(8, 0.0)
  free = decode.Decoder(cfg, params, eos_id=-1, pad_id=0, vocab_size=VOCAB).generate(_prompts(), greedy)
  eos = free[0].tokens[3]  # declare row 0's fourth token the end-of-sequence id
  assert eos not in free[1].tokens[:8] or free[1].tokens.index(eos) > 3
  stopped = decode.Decoder(cfg, params, eos_id=eos, pad_id=0, vocab_size=VOCAB).generate(_prompts(), greedy)
  assert stopped[0] == decode.Completion(free[0].tokens[: free[0].tokens.index(eos)], "stop")
  for free_row, row in zip(free[1:], stopped[1:]):
    expected = free_row.tokens[: free_row.tokens.index(eos)] if eos in free_row.tokens else free_row.tokens
    assert row.tokens == expected


def test_streamed_tokens_arrive_in_order_and_match_the_result(gpt2):
  cfg, params = gpt2
  decoder = decode.Decoder(cfg, params, eos_id=-1, pad_id=0, vocab_size=VOCAB)
  seen = []
  result = decoder.generate(_prompts()[:2], [decode.Sampling(5, 0.0), decode.Sampling(7, 0.0)],
                            on_step=lambda i, tokens, done: seen.append((i, tokens.tolist(), done.tolist())))
  assert [s[0] for s in seen] == list(range(7))
  assert [t[0] for _, t, d in seen if not d[0]] == result[0].tokens
  assert [t[1] for _, t, d in seen if not d[1]] == result[1].tokens


def test_sampling_rules():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 50)), jnp.float32).repeat(400, 0)
  order = np.argsort(-np.asarray(logits[0]))
  seeds = jnp.arange(400, dtype=jnp.uint32)

  def draw(temperature=1.0, top_k=0, top_p=1.0):
    full = lambda v, dt: jnp.full((400,), v, dt)  # noqa: E731
    return set(np.asarray(decode.sample_tokens(
        logits, seeds, 0, full(temperature, jnp.float32), full(top_k, jnp.int32), full(top_p, jnp.float32))).tolist())

  assert draw(temperature=0.0) == {order[0]}
  assert draw(top_k=1) == {order[0]}
  assert draw(top_k=3) == set(order[:3].tolist())  # 400 draws reach all three
  probs = np.asarray(jax.nn.softmax(logits[0]))[order]
  nucleus = int(np.searchsorted(np.cumsum(probs), 0.5)) + 1  # smallest prefix with mass >= 0.5
  assert draw(top_p=0.5) == set(order[:nucleus].tolist())
  assert len(draw()) > 20
  # Same seed and step, same token; another step, another stream.
  a = decode.sample_tokens(logits[:1], jnp.uint32([7]), 3, jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1))
  b = decode.sample_tokens(logits[:1], jnp.uint32([7]), 3, jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1))
  assert int(a[0]) == int(b[0])


def test_each_sampler_kind_draws_what_the_full_sort_draws():
  """The batch's plan only skips work: greedy, top-k (a partial sort) and plain
  (no sort) rows get the token the full sort gives them, over many seeds."""
  from tpu_lm.inference import sampling

  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(64, 300)) * 3, jnp.float32)
  seeds = jnp.arange(64, dtype=jnp.uint32)
  cases = [
      [decode.Sampling(temperature=0.0)] * 64,
      [decode.Sampling(temperature=0.0)] * 32 + [decode.Sampling(temperature=0.7, top_k=k) for k in range(1, 33)],
      [decode.Sampling(temperature=t) for t in np.linspace(0.1, 2, 64)],
      # Rows filtering by top-k beside rows that do not filter: neither shortcut serves both.
      [decode.Sampling(temperature=1.0)] * 32 + [decode.Sampling(temperature=1.0, top_k=3)] * 32,
  ]
  for rows in cases:
    kind, k = sampling.plan(rows)
    args = (jnp.float32([r.temperature for r in rows]), jnp.int32([r.top_k for r in rows]),
            jnp.float32([r.top_p for r in rows]))
    for step in range(3):
      want = decode.sample_tokens(logits, seeds, step, *args)
      got = decode.sample_tokens(logits, seeds, step, *args, kind=kind, max_top_k=k)
      np.testing.assert_array_equal(got, want)
  assert [sampling.plan(c)[0] for c in cases] == ["greedy", "top_k", "plain", "sort"]
  assert sampling.plan([decode.Sampling(top_p=0.9), decode.Sampling(top_k=5)]) == ("sort", 0)


@pytest.mark.slow  # a second compiled decoder, sharded
def test_tensor_parallel_decode_gives_the_tokens_of_one_device():
  config = tiny_config()
  config.model.update(num_heads=4, num_kv_heads=4)
  outputs = []
  for sizes, devices in (({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                         ({"data": 2, "fsdp": 1, "tensor": 4}, jax.devices())):
    setup = Setup(config, mesh_lib.make_mesh(sizes, devices))
    with setup.context():
      params = setup.init(jax.random.key(0)).params
    params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
    decoder = decode.Decoder(setup.model_cfg, params, eos_id=-1, pad_id=0, vocab_size=VOCAB, context=setup.context,
                             batch_multiple=sizes["data"])
    outputs.append(decoder.generate(_prompts(), [decode.Sampling(8, 0.0), decode.Sampling(8, 1.0, seed=1),
                                                 decode.Sampling(8, 0.0)]))
    if sizes["tensor"] > 1:  # the parameters really are split
      assert params["layers_0"]["attn"]["query"]["kernel"].sharding.spec[1] == "tensor"
  assert outputs[0] == outputs[1]


def test_requests_that_do_not_fit_are_refused(gpt2):
  cfg, params = gpt2
  decoder = decode.Decoder(cfg, params, eos_id=-1, pad_id=0, vocab_size=VOCAB)
  from tpu_lm.errors import UserError

  with pytest.raises(UserError, match="exceeds the model.s context of 64"):
    decoder.generate([[1] * 30], decode.Sampling(max_new_tokens=40))
  with pytest.raises(UserError, match="top_p"):
    decoder.generate([[1, 5]], decode.Sampling(top_p=0.0))


@pytest.mark.slow  # a training run of its own
def test_a_scanned_bfloat16_run_decodes_like_its_own_parameters(corpus_dir, data_dir, tmp_path):
  """A run trained with scan_layers=True in bfloat16: run_dir reads its scanned
  float32 parameters straight into bfloat16, per layer, and decodes what a decoder
  given the same parameters in the scanned layout does."""
  import orbax.checkpoint as ocp

  from tpu_lm.inference import run_dir
  from tpu_lm.training import loop

  config = tiny_config(corpus_dir, data_dir)
  config.update(num_train_steps=2, checkpoint_every_steps=2, eval_every_steps=2)
  config.model.update(scan_layers=True, dtype="bfloat16", remat="dots_no_batch")
  config.sample.num_prompts = 0
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(config, workdir)
  run = run_dir.load(workdir, devices=jax.devices()[:1])
  assert {str(x.dtype) for x in jax.tree.leaves(run.decoder.params)} == {"bfloat16"}
  assert "layers_1" in run.decoder.params and "layers" not in run.decoder.params
  saved = ocp.StandardCheckpointer().restore(f"{workdir}/checkpoints/2/state")["params"]
  assert saved["layers"]["attn"]["query"]["kernel"].shape[0] == 2  # the scanned layout on disk
  mine = decode.Decoder(run.decoder.cfg.__class__(**{**run.decoder.cfg.__dict__, "scan_layers": True}), saved,
                        eos_id=-1, pad_id=run.tokenizer.pad_id, vocab_size=run.tokenizer.vocab_size)
  prompts = [run.encode_prompt("the model reads"), run.encode_prompt("a")]
  greedy = decode.Sampling(12, 0.0)
  got = [c.tokens for c in run.decoder.generate(prompts, greedy)]
  want = [c.tokens[: len(g)] for c, g in zip(mine.generate(prompts, greedy), got)]
  assert got == want and all(len(g) > 0 for g in got)
