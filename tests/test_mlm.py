"""The masked LM, an encoder's objective (tasks/mlm.py): what it masks, the rows it
trains on, the attention it runs with, and a run of it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import cli_body, rows_resumed, tiny_config
from tpu_lm.config import derived
from tpu_lm.data import encode, stream
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.tasks import mlm


def _bytes():
  return tokenizer_lib.add_sentinels(tokenizer_lib.ByteTokenizer(), (mlm.MASK,))


def test_a_chosen_token_is_masked_80_replaced_10_and_kept_10_percent_and_the_rest_untouched():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 259, 200_000)
  replacements = np.arange(3, 259)
  inputs, chosen = mlm.mask_document(ids, np.random.default_rng(1), rate=0.15, mask_id=259, replacements=replacements)
  c = chosen.astype(bool)
  assert c.mean() == pytest.approx(0.15, abs=0.003)
  np.testing.assert_array_equal(inputs[~c], ids[~c])
  masked, kept = inputs[c] == 259, inputs[c] == ids[c]
  replaced = ~masked & ~kept
  assert masked.mean() == pytest.approx(0.8, abs=0.01)
  assert replaced.mean() == pytest.approx(0.1 * 255 / 256, abs=0.01)  # a draw equal to the token reads as kept
  assert kept.mean() == pytest.approx(0.1 + 0.1 / 256, abs=0.01)
  assert set(np.unique(inputs[c][replaced])) <= set(replacements)
  again, _ = mlm.mask_document(ids, np.random.default_rng(1), rate=0.15, mask_id=259, replacements=replacements)
  np.testing.assert_array_equal(inputs, again)  # seeded


def test_whole_word_masking_chooses_every_token_of_a_word_or_none():
  tok = _bytes()
  text = "def parse_line(self, raw):\n    return raw.split()\n" * 50
  [e] = encode.Encoder(tok, mlm.MaskedLM(rate=0.3, whole_word=True), randomize=True)([{"text": text}], [(0, 0, 0)])
  words, current = [], []
  for ch, chosen in zip(text, e.weights):
    if ch.isalnum() or ch == "_":
      current.append(chosen)
    elif current:
      words.append(current)
      current = []
  assert all(len(set(w)) == 1 for w in words)  # "parse_line" whole or not at all
  assert 0.2 < np.mean([w[0] for w in words]) < 0.4
  first, last = mlm.word_edges(tok)
  assert first[tok.encode_batch(["_"])[0][0]] and not first[tok.encode_batch(["."])[0][0]]


def test_training_masks_are_drawn_per_document_and_epoch_and_eval_masks_are_fixed():
  tok = _bytes()
  enc = encode.Encoder(tok, mlm.MaskedLM(), randomize=True)
  records = [{"text": "for item in sequence:\n    total += item\n" * 4}] * 3
  first = enc(records, [(0, 0, i) for i in range(3)])
  assert all(np.array_equal(a.inputs, b.inputs) for a, b in zip(first, enc(records, [(0, 0, i) for i in range(3)])))
  assert not np.array_equal(first[0].inputs, first[1].inputs)  # another document, another mask
  assert not np.array_equal(first[0].inputs, enc(records[:1], [(0, 1, 0)])[0].inputs)  # another epoch
  evals = encode.Encoder(tok, mlm.MaskedLM())(records)  # no keys: the eval's
  assert all(np.array_equal(e.inputs, evals[0].inputs) for e in evals)  # fixed by the text
  assert evals[0].weights.sum() > 0 and (evals[0].inputs == tok.sentinels[mlm.MASK]).any()
  for e, r in zip(first, records):
    np.testing.assert_array_equal(e.ids, tok.encode_batch([r["text"]])[0])


def test_an_encoder_row_reads_the_masked_document_and_predicts_each_token_at_its_own_position():
  tok = _bytes()
  docs = ["abcdefgh", "xyz"]
  source = type("Docs", (), {"__len__": lambda self: 2, "get": lambda self, idx: [{"text": docs[i]} for i in idx]})()
  enc = encode.Encoder(tok, mlm.MaskedLM(rate=0.5))
  encoded = enc([{"text": t} for t in docs])
  rows = [s.next_row(stream._fetcher(source, enc)) for s in [
      stream.ShardStream(source, shard=0, num_shards=1, seq_len=16, seed=0, bos_id=tok.bos_id, eos_id=tok.eos_id,
                         shuffle=False, one_pass=True, loss_mask=True)]]
  [row] = rows
  n0, n1 = len(docs[0]) + 2, len(docs[1]) + 2  # BOS + ids + EOS, every position a pair
  want_in = [tok.bos_id, *encoded[0].inputs, tok.eos_id, tok.bos_id, *encoded[1].inputs, tok.eos_id]
  want_out = [tok.bos_id, *encoded[0].ids, tok.eos_id, tok.bos_id, *encoded[1].ids, tok.eos_id]
  want_mask = [0, *encoded[0].weights, 0, 0, *encoded[1].weights, 0]
  np.testing.assert_array_equal(row["inputs"][:n0 + n1], want_in)
  np.testing.assert_array_equal(row["targets"][:n0 + n1], want_out)
  np.testing.assert_array_equal(row["loss_mask"][:n0 + n1], want_mask)
  np.testing.assert_array_equal(row["segment_ids"][:n0 + n1], [1] * n0 + [2] * n1)
  np.testing.assert_array_equal(row["positions"][:n0 + n1], [*range(n0), *range(n1)])
  assert not row["loss_mask"][n0 + n1:].any()
  # Training's packed blocks pair them the same way.
  block = stream._Block([d.tokens for d in [_doc(tok, e) for e in encoded]],
                        [d.mask for d in [_doc(tok, e) for e in encoded]], 16,
                        [d.targets for d in [_doc(tok, e) for e in encoded]]).row(0, True)
  for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions"):
    np.testing.assert_array_equal(block[k], row[k], err_msg=k)


def _doc(tok, encoded):
  s = stream.ShardStream([], shard=0, num_shards=1, seq_len=16, seed=0, bos_id=tok.bos_id, eos_id=tok.eos_id)
  s.supply("k", encoded)
  return s._cache["k"]


def test_masked_lm_rows_resume_exactly():
  tok = _bytes()
  rest, again = rows_resumed(tok, encode.Encoder(tok, mlm.MaskedLM(), randomize=True), loss_mask=True)
  for a, b in zip(rest, again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  assert any((b["inputs"] == tok.sentinels[mlm.MASK]).any() for b in rest)


def test_an_encoder_attends_both_ways_within_a_document_and_never_across():
  from tpu_lm.model import transformer

  config = tiny_config("/tmp", "/tmp")
  config.task.kind = "mlm"
  cfg = derived.model_config(config)
  assert cfg.attention_mask == "bidirectional"
  model = transformer.Transformer(dataclasses.replace(cfg, dtype="float32"))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 259, (1, 12)), jnp.int32)
  segments = jnp.asarray([[1] * 6 + [2] * 6])
  positions = jnp.asarray([list(range(6)) * 2])
  params = model.init(jax.random.key(0), tokens, segments, positions)["params"]
  logits = lambda t: model.apply({"params": params}, t, segments, positions)  # noqa: E731
  changed = logits(tokens.at[0, 4].set(7)) - logits(tokens)
  assert jnp.abs(changed[0, :4]).max() > 1e-4  # earlier positions see a later token of their document
  assert jnp.abs(changed[0, 6:]).max() == 0  # the next document sees nothing of it


@pytest.mark.parametrize("field, value, message", [
    ("mlm.rate", 0.0, "config field mlm.rate is 0.0: it must be the share of tokens chosen, in (0, 1]"),
    ("mlm.rate", 1.5, "config field mlm.rate is 1.5: it must be the share of tokens chosen, in (0, 1]"),
])
def test_bad_masking_settings_are_refused_in_one_line(field, value, message):
  from tpu_lm.config import checks
  from tpu_lm.sweeps import space

  config = space.apply(tiny_config("/tmp", "/tmp"), {"task.kind": "mlm", "data.tokenizer_path": "/tmp", field: value})
  with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
    checks.validate(config)


@pytest.mark.slow  # a training run
def test_an_encoder_trains_fills_masks_is_fine_tuned_and_refuses_left_to_right_generation(corpus_dir, data_dir,
                                                                                           tmp_path, capsys):
  from tpu_lm.inference import fill_mask, run_dir
  from tpu_lm.training import loop

  from tpu_lm.config import defaults

  config = tiny_config(corpus_dir, data_dir)
  config.task.kind = "mlm"
  defaults.bert_block(config.model)  # as configs/encoder.py: it exports as a RoFormerForMaskedLM
  config.model.position = "rope"
  config.num_train_steps = 12
  workdir = str(tmp_path / "run")
  result = loop.train_and_evaluate(config, workdir)
  assert {"eval_loss", "eval_accuracy", "eval_bits_per_token", "eval_tokens"} <= set(result)
  assert result["eval_bits_per_token"] == pytest.approx(result["eval_loss"] / np.log(2))
  assert 0 < result["eval_accuracy"] <= 1 and result["eval_loss"] < np.log(259)
  again = loop.train_and_evaluate(config, workdir)  # finished: the same eval, the same fixed masks
  assert again["eval_loss"] == pytest.approx(result["eval_loss"])
  assert tokenizer_lib.load_for_run(workdir).sentinels == {mlm.MASK: 259}
  with pytest.raises(UserError, match="is an encoder \\(mlm run\\): .* --fill_mask='... <mask> ...'\\.$"):
    run_dir.load(workdir)
  # Its masks filled: the distribution at the mask over the text tokens, from the logits.
  encoder = run_dir.load_encoder(workdir)
  [candidates] = fill_mask.fill(encoder, "def <mask>(self):", top_k=4)
  tok = encoder.tokenizer
  ids = [tok.bos_id, *tok.encode_batch(["def "])[0], tok.sentinels[mlm.MASK], *tok.encode_batch(["(self):"])[0],
         tok.eos_id]
  logits = encoder.model.apply({"params": encoder.params}, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                               jnp.arange(len(ids))[None])[0, 5, 3:259]  # the mask's position; byte ids only
  probs = np.asarray(jax.nn.softmax(logits.astype(jnp.float32)))
  want = np.argsort(-probs, kind="stable")[:4]
  assert [c.token_id - 3 for c in candidates] == list(want)
  np.testing.assert_allclose([c.probability for c in candidates], probs[want], rtol=1e-4)
  assert candidates[0].sequence == f"def {candidates[0].token}(self):"
  with pytest.raises(UserError, match="^--fill_mask text has no <mask>: write <mask> where"):
    fill_mask.fill(encoder, "def f(self):")
  capsys.readouterr()  # what training printed
  cli_body("generate", [f"--workdir={workdir}", "--fill_mask=def <mask>(self):", "--top_k=2"])
  out = capsys.readouterr().out.splitlines()
  assert out[0] == "--- 'def <mask>(self):': mask 1/1 ---" and len(out) == 3
  assert out[1].startswith(f"{candidates[0].probability:.4f}  {candidates[0].token!r}")
  with pytest.raises(UserError, match="^--fill_mask asks an encoder to fill masks: leave out --prompt"):
    cli_body("generate", [f"--workdir={workdir}", "--fill_mask=<mask>", "--prompt=a"])
  _served_for_embeddings(encoder)
  _exported_to_transformers(encoder, tmp_path / "hf", candidates)
  # Compressed (int8 weights): its masked-token eval before and after, and it still fills masks.
  from tpu_lm.model import quant
  from tpu_lm.training import compression, prune

  out_dir = str(tmp_path / "int8")
  done = compression.compress(workdir, out_dir, quant_spec=quant.Spec(weight_qtype="int8"),
                              prune_spec=prune.Spec())
  assert abs(done.compressed["eval_bits_per_token"] - done.source["eval_bits_per_token"]) < 0.05
  assert done.bits_per_weight < 32  # the blocks int8; the tied embedding table, most of this tiny model, float
  [small] = fill_mask.fill(run_dir.load_encoder(out_dir), "def <mask>(self):", top_k=4)
  assert [c.token_id for c in small][:2] == [c.token_id for c in candidates][:2]
  with pytest.raises(UserError, match="^--draft_workdir is for a decoder; .* is an encoder"):
    cli_body("serve", [f"--workdir={workdir}", f"--draft_workdir={workdir}"])
  # Fine-tuned into a classifier: from its first (CLS) token, reading both ways.
  cls = tiny_config("", data_dir)
  cls.update(init_from=workdir, num_train_steps=6, eval_every_steps=100, checkpoint_every_steps=100)
  cls.task.update(kind="classification", attention="bidirectional", pooling="first")
  cls.data.update(dataset="stdlib_functions", max_documents=400, seq_len=64, sentinels=(mlm.MASK,))
  cls.model = config.model.copy_and_resolve_references()
  result = loop.train_and_evaluate(cls, str(tmp_path / "cls"))
  assert 0 <= result["eval_accuracy"] <= 1 and len(result["eval_confusion"]) == 10
  cls.task.attention = ""  # a decoder's mask on an encoder's parameters
  with pytest.raises(UserError, match=r"is an encoder \(its attention is bidirectional\), this config's attention is"
                                      r" causal: .* \(set task.attention='bidirectional' for a classifier\)\.$"):
    loop.train_and_evaluate(cls, str(tmp_path / "cls2"))


def _exported_to_transformers(run, out, candidates):
  """Exported: a RoFormerForMaskedLM with our logits, whose tokenizer reads <mask> as its
  mask token and closes a text with EOS, as training packed documents; transformers'
  fill-mask pipeline answers as --fill_mask does."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tpu_lm.interop import hf

  hf.export_model(run.workdir, str(out))
  model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  assert type(model).__name__ == "RoFormerForMaskedLM"
  theirs_tok = transformers.AutoTokenizer.from_pretrained(out)
  ids = theirs_tok("def <mask>(self):").input_ids
  assert ids == run.encode_prompt("def <mask>(self):")
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()
  ours = run.model.apply({"params": run.params}, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                         jnp.arange(len(ids))[None])
  np.testing.assert_allclose(theirs, np.asarray(ours)[..., :theirs.shape[-1]], atol=1e-4, rtol=0)
  pipe = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out))
  special = set(theirs_tok.all_special_ids)
  answers = [c for c in pipe("def <mask>(self):", top_k=12) if c["token"] not in special][:len(candidates)]
  assert [c["token"] for c in answers] == [c.token_id for c in candidates]


def _served_for_embeddings(run):
  """An encoder's server: /v1/embeddings (its first token's state, as configured), and a
  one-line refusal of completions."""
  import http.client
  import json

  from tpu_lm.serving.app import create_app
  from tpu_lm.serving.requests import Limits
  from tpu_lm.serving.server import Server

  limits = Limits(max_prompt_tokens=32, max_new_tokens=8, max_body_bytes=4000, timeout_s=30, max_batch=4)
  server = Server(create_app(run, None, limits, embedding_pooling="first"), "127.0.0.1", 0, max_connections=4,
                  max_per_client=4, header_timeout_s=5, write_timeout_s=30)

  def post(path, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.address[1], timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read())
    conn.close()
    return out

  with server.started():
    status, out = post("/v1/embeddings", {"input": ["def f(x):", "return <mask>"]})
    assert status == 200 and len(out["data"]) == 2, out
    ids = run.encode_prompt("def f(x):")  # [BOS] text [EOS], as training read documents
    assert ids[0] == run.tokenizer.bos_id and ids[-1] == run.tokenizer.eos_id
    hidden = run.model.apply({"params": run.params}, jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32),
                             jnp.arange(len(ids))[None], method="hidden").astype(jnp.float32)[0, 0]
    np.testing.assert_allclose(out["data"][0]["embedding"], hidden / jnp.linalg.norm(hidden), atol=2e-3)
    status, out = post("/v1/completions", {"prompt": "a"})
    assert status == 400 and "is an encoder (it reads both ways and generates nothing): it answers POST" \
        " /v1/embeddings" in out["error"]["message"]
    status, out = post("/tokenize", {"prompt": "a <mask>"})
    assert status == 200 and out["tokens"][-2] == run.tokenizer.sentinels[mlm.MASK]
