"""Continuous batching (engine.py over slots.py), in process: a request decodes the
tokens it decodes alone whoever joins or leaves the batch; a short request finishes
while a long one runs; stops, cancellation, logprobs and shutdown."""

import math
import queue
import threading
import time
import types

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.test_decode import EOS, VOCAB, _model, _prompts
from tests.test_decode import _full_logits as full_logits
from tpu_lm.inference import decode
from tpu_lm.inference.engine import Closed, Engine, Job
from tpu_lm.inference import slots as slots_lib
from tpu_lm.inference.slots import TOP_LOGPROBS
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training.setup import Setup


@pytest.fixture(scope="module")
def decoder():
  cfg, params = _model({})
  return decode.Decoder(cfg, params, eos_id=EOS, pad_id=0, vocab_size=VOCAB)


def _engine(decoder, max_batch=4):
  return Engine(types.SimpleNamespace(decoder=decoder), max_batch=max_batch)


def _job(prompt, sampling, index=0, request_id="r", logprobs=False):
  return Job(index, prompt, sampling, queue.Queue(), threading.Event(), request_id, logprobs)


def _collect(job, timeout=60):
  """(tokens streamed, their logprobs, the done payload) of one job."""
  tokens, logprobs = [], []
  while True:
    kind, _, payload, *rest = job.events.get(timeout=timeout)
    if kind == "token":
      tokens.append(payload)
      logprobs.append(rest[0])
    elif kind == "done":
      return tokens, logprobs, payload
    else:
      raise AssertionError(f"{kind}: {payload}")


SAMPLINGS = [decode.Sampling(max_new_tokens=9, temperature=0), decode.Sampling(max_new_tokens=30, temperature=0.8, seed=3),
             decode.Sampling(max_new_tokens=5, temperature=1.0, top_k=7, seed=1),
             decode.Sampling(max_new_tokens=17, temperature=0.7, top_p=0.9, seed=2)]


def test_requests_joining_and_leaving_decode_what_each_decodes_alone(decoder):
  prompts = _prompts() + [[1, 5, 6, 7]]
  want = [decoder.generate([p], s)[0] for p, s in zip(prompts, SAMPLINGS)]
  engine = _engine(decoder)
  jobs = [_job(p, s, i) for i, (p, s) in enumerate(zip(prompts, SAMPLINGS))]
  engine.submit(jobs[:1])
  _, _, first = _collect(jobs[0])  # alone
  engine.submit(jobs[1:2])
  time.sleep(0.05)  # the long one is running when the others join, at different steps
  engine.submit(jobs[2:3])
  engine.submit(jobs[3:])
  got = [first] + [_collect(j)[2] for j in jobs[1:]]
  assert [(c.tokens, c.finish_reason) for c in got] == [(c.tokens, c.finish_reason) for c in want]


def test_a_sequence_with_hostile_settings_fails_alone_and_the_others_decode_on(decoder):
  """Settings that bypass the HTTP parser (top_k past int32, a prompt past the context)
  fail their own sequence with a 400; the one in flight decodes what it decodes alone."""
  engine = _engine(decoder)
  prompt, sampling = _prompts()[1], SAMPLINGS[1]
  good = _job(prompt, sampling, request_id="good")
  engine.submit([good])
  assert good.events.get(timeout=60)[0] == "token"  # in flight when the hostile ones join
  hostile = [_job([1, 4], decode.Sampling(max_new_tokens=9, temperature=1.0, top_k=2**31), request_id="top_k"),
             _job([1] * 80, decode.Sampling(max_new_tokens=4), index=1, request_id="long")]
  engine.submit(hostile)
  for job, word in zip(hostile, ("top_k", "context")):
    kind, _, (status, message) = job.events.get(timeout=60)
    assert (kind, status) == ("error", 400) and word in message, message
  tokens, _, done = _collect(good)
  want = decoder.generate([prompt], sampling)[0]
  assert (done.tokens, done.finish_reason) == (want.tokens, want.finish_reason)
  assert tokens == want.tokens[1:]  # the first was taken above


def test_a_short_request_finishes_while_a_long_one_is_still_decoding(decoder):
  engine = _engine(decoder, max_batch=2)
  long = _job([1, 9, 9], decode.Sampling(max_new_tokens=60, temperature=1.0, seed=0), request_id="long")
  engine.submit([long])
  first = long.events.get(timeout=60)  # the long one is in flight
  assert first[0] == "token"
  short = _job([1, 4], decode.Sampling(max_new_tokens=3, temperature=0), request_id="short")
  engine.submit([short])
  _collect(short)
  assert engine.running() == 1  # the long one is still decoding: no head-of-line blocking
  _collect(long)


def test_a_halted_or_cancelled_sequence_leaves_the_batch_at_the_next_step(decoder):
  engine = _engine(decoder)
  halted = _job([1, 3], decode.Sampling(max_new_tokens=60, temperature=1.0))
  cancelled = _job([1, 4], decode.Sampling(max_new_tokens=60, temperature=1.0), index=1)
  engine.submit([halted, cancelled])
  assert halted.events.get(timeout=60)[0] == "token"
  halted.halt.set()  # as the server does when a stop sequence appears
  cancelled.cancelled.set()  # as it does when the client goes
  tokens, _, done = _collect(halted)
  assert done.finish_reason == "stop" and len(done.tokens) < 60
  deadline = time.time() + 30
  while engine.running() and time.time() < deadline:
    time.sleep(0.01)
  assert engine.running() == 0


def test_logprobs_are_the_models_and_the_chosen_token_is_the_top_one_when_greedy(decoder):
  engine = _engine(decoder)
  prompt = _prompts()[1]
  job = _job(prompt, decode.Sampling(max_new_tokens=6, temperature=0), logprobs=True)
  engine.submit([job])
  tokens, logprobs, _ = _collect(job)
  logits = np.asarray(_full_logits(decoder, prompt + tokens))
  for i, (token, (lp, top)) in enumerate(zip(tokens, logprobs)):
    row = logits[len(prompt) - 1 + i, :VOCAB]
    want = row - (np.log(np.sum(np.exp(row - row.max()))) + row.max())
    assert math.isclose(lp, want[token], abs_tol=1e-3)
    assert len(top) == TOP_LOGPROBS and top[0][0] == token
    assert [t for t, _ in top] == list(np.argsort(-want)[:TOP_LOGPROBS])


def _full_logits(decoder, ids):
  return full_logits(decoder.cfg, decoder.params, np.asarray([ids]))[0]


def test_shutdown_finishes_what_fits_the_grace_cancels_the_rest_and_refuses_the_waiting(decoder):
  engine = _engine(decoder, max_batch=1)
  running = _job([1, 3], decode.Sampling(max_new_tokens=60, temperature=1.0), request_id="running")
  waiting = _job([1, 4], decode.Sampling(max_new_tokens=4, temperature=0), request_id="waiting")
  engine.submit([running])
  assert running.events.get(timeout=60)[0] == "token"
  engine.submit([waiting])
  report = engine.close(grace_s=0.0)
  assert (report.finished, report.cancelled, report.refused) == ([], ["running"], ["waiting"])
  events = [running.events.get(timeout=5) for _ in range(running.events.qsize())]
  assert events[-1][0] == "error" and events[-1][2][0] == 503
  assert waiting.events.get(timeout=5)[2] == (503, "the server shut down before this request started: retry it.")
  with pytest.raises(Closed):
    engine.submit([_job([1], decode.Sampling())])

  # A step held while close() starts: the sequence is in flight, and finishes in the grace.
  gated = _Gated(slots_lib.SlotDecoder(decoder, 1))
  engine = Engine(types.SimpleNamespace(decoder=decoder), max_batch=1, slots=gated)
  quick = _job([1, 3], decode.Sampling(max_new_tokens=4, temperature=0), request_id="quick")
  engine.submit([quick])
  assert gated.entered.wait(60)
  closing = {}
  closer = threading.Thread(target=lambda: closing.setdefault("report", engine.close(grace_s=60.0)))
  closer.start()
  while engine._closing_at is None:
    time.sleep(0.01)
  gated.gate.set()
  closer.join(60)
  report = closing["report"]
  assert (report.finished, report.cancelled, report.refused) == (["quick"], [], [])
  assert len(_collect(quick)[0]) <= 4


class _Gated:
  """A SlotDecoder whose steps wait for `gate` (a test holds a sequence in flight)."""

  def __init__(self, slots):
    self._slots, self.gate, self.entered = slots, threading.Event(), threading.Event()

  def step(self, rows):
    self.entered.set()
    assert self.gate.wait(60)
    return self._slots.step(rows)

  def __getattr__(self, name):
    return getattr(self._slots, name)


def test_the_cache_shrinks_after_a_lull_without_changing_what_is_decoded(decoder, monkeypatch):
  monkeypatch.setattr(slots_lib, "SHRINK_AFTER", 4)
  engine = _engine(decoder, max_batch=4)
  long = _job(_prompts()[0], decode.Sampling(max_new_tokens=40, temperature=0.9, seed=4), index=0)
  short = [_job([1, 5 + i], decode.Sampling(max_new_tokens=3, temperature=0), index=1 + i) for i in range(3)]
  engine.submit([long, *short])  # four rows; three leave after 3 steps, the long one goes on alone
  shapes = []
  done = None
  while done is None:
    kind, _, payload, *_ = long.events.get(timeout=60)
    shapes.append(engine.slots.shape[0])
    if kind == "done":
      done = payload
  assert shapes[0] == 4 and shapes[-1] == 1  # shrunk while the long row was in flight
  assert done.tokens == decoder.generate([long.prompt_ids], long.sampling)[0].tokens


@pytest.mark.slow  # compiles the sharded slots
def test_a_sharded_engine_decodes_what_one_device_decodes():
  """Data 2 x tensor 4 on the 8 fake devices: the slot cache and step run sharded."""
  config = tiny_config()
  config.model.update(num_heads=4, num_kv_heads=4)
  setup = Setup(config, mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 4}, jax.devices()))
  with setup.context():
    params = setup.init(jax.random.key(0)).params
  params = jax.tree.map(lambda x: x * 4 if x.ndim > 1 else x, params)
  sharded = decode.Decoder(setup.model_cfg, params, eos_id=EOS, pad_id=0, vocab_size=VOCAB, context=setup.context,
                           batch_multiple=2)
  single = decode.Decoder(setup.model_cfg, jax.device_get(params), eos_id=EOS, pad_id=0, vocab_size=VOCAB)
  engine = _engine(sharded, max_batch=4)
  jobs = [_job(p, s, i) for i, (p, s) in enumerate(zip(_prompts(), SAMPLINGS))]
  engine.submit(jobs)
  got = [_collect(j)[2] for j in jobs]
  assert engine.slots.shape[0] % 2 == 0  # rows a multiple of the data-parallel size
  assert got == [single.generate([j.prompt_ids], j.sampling)[0] for j in jobs]
