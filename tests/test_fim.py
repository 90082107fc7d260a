"""Fill in the middle: the documents it trains on, its sentinels, and an infill asked
for over HTTP (tasks/fim.py)."""

import glob
import http.client
import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.conftest import rows_resumed
from tpu_lm.data import encode
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.inference import run_dir
from tpu_lm.inference.sampling import Sampling
from tpu_lm.inference.stops import StoppedText
from tpu_lm.tasks import fim

TEXTS = ["def f(x):\n    return x + 1\n", "print('<|fim_prefix|> is text here')\n", "", "é\n" * 7]


def _bytes():
  return tokenizer_lib.add_sentinels(tokenizer_lib.ByteTokenizer(), fim.SENTINELS)


def _reassembled(ids, tok) -> tuple[bool, str]:
  """(whether it is in SPM order, the document's text put back together) of a FIM document."""
  s, ids = tok.sentinels, list(ids)
  pre, suf, mid, end = (ids.index(s[name]) for name in fim.SENTINELS)
  assert ids[0] == s[fim.PREFIX] and ids[-1] == s[fim.END] and pre < suf < mid < end
  if suf == pre + 1:  # SPM: suffix, then prefix and middle
    return True, tok.decode(ids[mid + 1:end]) + tok.decode(ids[suf + 1:mid])
  return False, tok.decode(ids[pre + 1:suf]) + tok.decode(ids[mid + 1:end]) + tok.decode(ids[suf + 1:mid])


def test_documents_are_cut_and_rearranged_losslessly_by_a_seeded_draw():
  tok = _bytes()
  records = [{"text": t} for t in TEXTS]
  keys = [(0, 0, i) for i in range(len(TEXTS))]
  for spm_rate in (0.0, 1.0):
    enc = encode.Encoder(tok, fim.FillInMiddle(rate=1.0, spm_rate=spm_rate), randomize=True)
    orders = []
    for text, e in zip(TEXTS, enc(records, keys)):
      spm, back = _reassembled(e.ids, tok)
      assert back == text and e.num_bytes == len(text.encode())
      orders.append(spm)
    assert all(orders) if spm_rate else not all(orders)  # (PSM with an empty prefix reads as SPM)
  mixed = encode.Encoder(tok, fim.FillInMiddle(rate=0.5), randomize=True)
  many = [{"text": "abcdefgh"}] * 400
  first = mixed(many, [(3, 1, i) for i in range(400)])
  again = mixed(many, [(3, 1, i) for i in range(400)])  # a resumed run draws the same
  assert all(np.array_equal(a.ids, b.ids) for a, b in zip(first, again))
  cut = sum(tok.sentinels[fim.MIDDLE] in e.ids for e in first)
  assert 150 < cut < 250  # fim.rate of them
  other_epoch = mixed(many, [(3, 2, i) for i in range(400)])
  assert any(not np.array_equal(a.ids, b.ids) for a, b in zip(first, other_epoch))
  # Pieces of at most 12 characters, each cut on its own: several units, each whole.
  lines = "".join(f"line {i}\n" for i in range(10))
  [e] = encode.Encoder(tok, fim.FillInMiddle(rate=1.0, spm_rate=0.0, max_chars=12), randomize=True)(
      [{"text": lines}], [(0, 0, 9)])
  ends = [i + 1 for i, t in enumerate(e.ids) if t == tok.sentinels[fim.END]]
  units = [e.ids[a:b] for a, b in zip([0, *ends], ends)]
  assert len(units) == 10 and "".join(_reassembled(u, tok)[1] for u in units) == lines
  assert fim.pieces(lines, 12) == [f"line {i}\n" for i in range(10)] and fim.pieces(lines, 0) == [lines]
  # Eval and sample prompts (no keys), and a split not marked for training: left to right.
  for e, text in zip(mixed(many[:4]) + encode.Encoder(tok, mixed.objective)(many[:4], [(0, 0, i) for i in range(4)]),
                     ["abcdefgh"] * 8):
    assert list(e.ids) == list(tok.encode_batch([text])[0])


def test_sentinels_are_the_tokenizers_own_and_survive_the_run_directory(tmp_path):
  tok = _bytes()
  assert tok.vocab_size == 263 and tok.sentinels[fim.PREFIX] == 259 and tok.name != tokenizer_lib.ByteTokenizer.name
  text = "x = '<|fim_middle|>'"
  assert max(tok.encode_batch([text])[0]) < 259  # a text holding a sentinel's name encodes as text
  assert tokenizer_lib.encode_text(tok, text) == [*tok.encode_batch(["x = '"])[0], 261, 42]  # a client's: the token
  assert tokenizer_lib.add_sentinels(tok, fim.SENTINELS) is tok
  tokenizer_lib.save_for_run(tok, str(tmp_path))
  back = tokenizer_lib.load_for_run(str(tmp_path))
  assert back.sentinels == tok.sentinels and back.vocab_size == 263 and back.name == tok.name
  plain = tokenizer_lib.ByteTokenizer()
  assert plain.sentinels == {} and plain.vocab_size == 259  # adding them made a copy


def test_an_end_token_ends_the_text_and_releases_what_a_stop_held_back():
  tok = _bytes()
  text = StoppedText(tok, ("xyz",), end_id=262)
  pieces = [text.push(int(t)) for t in tok.encode_batch(["ab x"])[0]]
  assert "".join(pieces) == "ab"  # " x" could begin the stop sequence: held
  assert text.push(262) == " x" and text.ended and text.push(int(tok.encode_batch(["q"])[0][0])) == ""
  assert text.text == "ab x"


def test_fim_training_rows_resume_exactly():
  tok = _bytes()
  rest, again = rows_resumed(tok, encode.Encoder(tok, fim.FillInMiddle(rate=0.5), randomize=True))
  for a, b in zip(rest, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert any((b["inputs"] == tok.sentinels[fim.MIDDLE]).any() for b in rest)


@pytest.fixture(scope="module")
def fim_run(trained_run, tmp_path_factory):
  """The tiny trained run as if trained with task.kind='fim': its saved config and
  tokenizer say so (its byte vocabulary's table, padded to 384 rows, holds the
  sentinels' ids already)."""
  workdir = str(tmp_path_factory.mktemp("fim") / "run")
  shutil.copytree(trained_run, workdir)
  for path in glob.glob(os.path.join(workdir, "checkpoints", "*", "config", "metadata")):
    with open(path) as f:
      config = json.load(f)
    config["task"]["kind"] = "fim"
    with open(path, "w") as f:
      json.dump(config, f)
  tokenizer_lib.save_for_run(_bytes(), workdir)
  return workdir


class _EndsAt(fim.FillInMiddle):
  """The objective with another token as its end of middle: an untrained model rarely
  draws the real one, and where the middle ends is what is tested."""

  end = 0

  def end_id(self, tokenizer):
    return self.end


@pytest.mark.slow  # a server and two compiled decoders
def test_an_editor_sends_prefix_and_suffix_over_http_and_gets_the_middle(fim_run):
  from tpu_lm.inference.engine import Engine
  from tpu_lm.serving.app import create_app
  from tpu_lm.serving.requests import Limits
  from tpu_lm.serving.server import Server

  run = run_dir.load(fim_run, devices=jax.devices()[:1])
  prefix, suffix = "def f(x):\n    ", "\n    return y\n"
  ids = run.objective.infill_prompt(run.tokenizer, prefix, suffix)
  assert ids[:3] == [run.tokenizer.bos_id, 259, 260] and 261 in ids  # SPM: the middle continues the prefix
  [c] = run.decoder.generate([ids], Sampling(12, 1.0, 0, 1.0, 3))  # sampled: an untrained model's greedy text repeats
  k = next(i for i in range(1, len(c.tokens)) if c.tokens[i] not in c.tokens[:i])  # a first occurrence
  objective = _EndsAt(run.objective.text_key)
  objective.end = c.tokens[k]
  run = run_dir.Run(run.workdir, run.step, run.config, run.tokenizer, run.decoder, objective)
  limits = Limits(max_prompt_tokens=40, max_new_tokens=12, max_body_bytes=4000, timeout_s=60, max_batch=2)
  engine = Engine(run, 2)
  server = Server(create_app(run, engine, limits), "127.0.0.1", 0, max_connections=4, max_per_client=4,
                  header_timeout_s=5, write_timeout_s=30)
  with server.started():
    def post(body):
      conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=60)
      conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
      resp = conn.getresponse()
      out = resp.status, json.loads(resp.read())
      conn.close()
      return out

    status, out = post({"prompt": prefix, "suffix": suffix, "max_tokens": 12, "temperature": 1, "seed": 3})
    assert status == 200, out
    [choice] = out["choices"]
    assert choice["text"] == run.tokenizer.decode(c.tokens[:k]) and choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == k + 1  # the end of middle is drawn
    assert out["usage"]["prompt_tokens"] == len(ids) - 1  # the server's BOS is not the client's
    for body, message in [({"prompt": prefix, "suffix": 3}, "'suffix' must be a string"),
                          ({"prompt": [5, 6], "suffix": "x"}, "'suffix' goes with a text prompt"),
                          ({"prompt": prefix, "suffix": "x", "echo": True}, "'echo' with 'suffix' is not supported")]:
      status, out = post(body)
      assert status == 400 and message in out["error"]["message"]
  engine.close(0)


def test_the_hugging_face_export_knows_the_sentinels_at_the_runs_ids(tmp_path):
  import tokenizers

  from tpu_lm.interop import tokenizer_export

  tok = _bytes()
  tokenizer_export.write(tok, str(tmp_path))
  hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
  prefix, suffix = "def f(", "):\n"
  for order, text in (("psm", "<|fim_prefix|>def f(<|fim_suffix|>):\n<|fim_middle|>"),
                      ("spm", "<|fim_prefix|><|fim_suffix|>):\n<|fim_middle|>def f(")):
    assert hf.encode(text).ids == fim.FillInMiddle().infill_prompt(tok, prefix, suffix, order)  # BOS: post-processor
  assert fim.FillInMiddle(spm_rate=0.0).infill_prompt(tok, prefix, suffix) == fim.FillInMiddle().infill_prompt(
      tok, prefix, suffix, "psm")
  assert hf.decode(hf.encode(text).ids) == suffix + prefix  # (SPM) special tokens skipped, as tpu_lm decodes
  with open(tmp_path / "tokenizer_config.json") as f:
    assert json.load(f)["additional_special_tokens"] == list(fim.SENTINELS)
