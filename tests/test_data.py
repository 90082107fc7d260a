import numpy as np
import pytest

from tests.conftest import tiny_config
from tpu_lm.data import local_files, packing, pipeline, sources
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError


def test_split_is_fixed_and_about_five_percent():
  root, rel = local_files.stdlib_files()
  assert 1500 < len(rel) < 2500, "the stdlib corpus should hold about 1,800 files"
  assert not any("site-packages" in r for r in rel)
  split = local_files.split_files(rel)
  frac = len(split["validation"]) / len(rel)
  assert 0.03 < frac < 0.08
  # The rule depends on the path alone: the same file lands in the same split
  # whatever else is in the corpus.
  assert local_files.split_files(rel[::-1]) == split
  assert set(local_files.split_files(rel[:400])["validation"]) <= set(split["validation"])


def test_a_tiny_directory_still_gets_a_validation_file():
  split = local_files.split_files(["a.txt", "b.txt"])
  assert len(split["validation"]) == 1 and len(split["train"]) == 1
  with pytest.raises(UserError, match="at least 2"):
    local_files.split_files(["a.txt"])


def _stream(docs):
  return packing.from_documents(docs, 0, 1, 2, np.uint16)


def test_packing_predicts_every_target_once_and_never_across_documents():
  docs = [[10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], []]
  stream = _stream(docs)
  seq_len = 5
  rows = [packing.make_row(stream, r, seq_len) for r in range(stream.num_rows(seq_len, drop_remainder=False))]
  inputs = np.concatenate([r["inputs"] for r in rows])
  targets = np.concatenate([r["targets"] for r in rows])
  seg = np.concatenate([r["segment_ids"] for r in rows])
  real = seg > 0
  framed = [[1, *doc, 2] for doc in docs]
  expected_pairs = [(d[i], d[i + 1]) for d in framed for i in range(len(d) - 1)]
  assert list(zip(inputs[real], targets[real])) == expected_pairs
  for r in rows:
    # Within a row, each segment is one document and positions count from 0 at
    # its first token in the row.
    for s in set(r["segment_ids"][r["segment_ids"] > 0]):
      pos = r["positions"][r["segment_ids"] == s]
      assert list(pos) == list(range(pos[0], pos[0] + len(pos)))
      assert pos[0] == 0
  assert rows[-1]["segment_ids"][-1] == 0  # the remainder is padding, weight 0


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece"])
def test_tokenizers_are_lossless(kind, corpus_dir, tmp_path):
  texts = ["def f(x):\n    return x  # ünïcode ✓\n\n\tend", "plain   spaces\r\n"]
  if kind == "bytes":
    tok = tokenizer_lib.ByteTokenizer()
  else:
    training = [open(f"{corpus_dir}/doc{i:03d}.txt").read() for i in range(10)] + texts
    tok = tokenizer_lib.load_or_train(str(tmp_path / "t.model"), 300, training)
    again = tokenizer_lib.load_or_train(str(tmp_path / "t.model"), 300, [])  # from the cache
    assert again.name == tok.name
  for text, ids in zip(texts, tok.encode_batch(texts)):
    assert tok.decode(ids) == text


def test_corrupt_tokenizer_file_is_a_user_error(tmp_path):
  path = tmp_path / "bad.model"
  path.write_bytes(b"not a sentencepiece model")
  with pytest.raises(UserError, match="corrupt"):
    tokenizer_lib.load_or_train(str(path), 300, [])


def test_process_slices_tile_the_global_batch():
  stream = _stream([list(range(3, 200))] * 20)
  kw = dict(seq_len=16, global_batch=8, seed=3)
  whole = pipeline.train_iter(stream, **kw)
  halves = [pipeline.train_iter(stream, **kw, process_index=i, process_count=2) for i in range(2)]
  for _ in range(5):
    g = next(whole)
    parts = [next(h) for h in halves]
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([p[k] for p in parts]))


def test_iterator_state_resumes_exactly():
  stream = _stream([list(range(3, 200))] * 20)
  it = pipeline.train_iter(stream, seq_len=16, global_batch=4, seed=0)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(30)]  # runs past an epoch boundary
  fresh = pipeline.train_iter(stream, seq_len=16, global_batch=4, seed=0)
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], e)


def test_text_files_dataset_builds_and_caches(corpus_dir, data_dir):
  config = tiny_config(corpus_dir, data_dir)
  corpus = sources.prepare(config.data)
  assert corpus.train.num_docs + corpus.validation.num_docs == 24
  text = "".join(open(f"{corpus_dir}/doc{i:03d}.txt").read() for i in range(24))
  assert corpus.train.num_bytes + corpus.validation.num_bytes == len(text.encode())
  assert 0 < corpus.zlib_bits_per_byte < 8
  again = sources.prepare(config.data)
  np.testing.assert_array_equal(again.train.tokens, corpus.train.tokens)


def test_a_warm_cache_is_read_without_opening_the_dataset(corpus_dir, data_dir, tmp_path, monkeypatch):
  """Warm starts skip TFDS (and TensorFlow's import); a changed file rebuilds."""
  import shutil

  corpus_copy = str(tmp_path / "corpus")
  shutil.copytree(corpus_dir, corpus_copy)
  config = tiny_config(corpus_copy, data_dir)
  config.data.tokenizer, config.data.vocab_size = "sentencepiece", 300
  cold = sources.prepare(config.data)
  opened = []
  real_builder = sources._builder
  monkeypatch.setattr(sources, "_builder", lambda data: opened.append(data) or real_builder(data))
  warm = sources.prepare(config.data)
  assert opened == []
  assert warm.tokenizer.name == cold.tokenizer.name and warm.zlib_bits_per_byte == cold.zlib_bits_per_byte
  np.testing.assert_array_equal(warm.validation.tokens, cold.validation.tokens)
  with open(f"{corpus_copy}/doc000.txt", "a") as f:
    f.write("one more line\n")
  changed = sources.prepare(config.data)
  assert len(opened) == 1 and changed.train.num_bytes + changed.validation.num_bytes > cold.train.num_bytes + cold.validation.num_bytes


def test_unknown_dataset_and_empty_directory_are_user_errors(tmp_path, data_dir):
  config = tiny_config(str(tmp_path / "empty"), data_dir)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="matches no files"):
    sources.prepare(config.data)
  config.data.dataset = "no_such_dataset_anywhere"
  with pytest.raises(UserError, match="neither"):
    sources.prepare(config.data)


def test_tokenizers_own_their_special_ids_and_a_run_records_them(tmp_path):
  """A SentencePiece model made elsewhere, with its own ids, is used as it is."""
  import io
  import json

  import sentencepiece as spm

  out = io.BytesIO()
  texts = ["".join(chr(97 + (i * j) % 26) + " " for i in range(40)) + "0123456789ABCDEFGHIJKLMNOPQRST" for j in range(300)]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=out, vocab_size=60, unk_id=0, model_type="char",
                                 bos_id=4, eos_id=5, pad_id=-1, minloglevel=2)
  tok = tokenizer_lib.SentencePieceTokenizer(out.getvalue())
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (4, 5, 5)  # no pad piece: pads with EOS
  tokenizer_lib.save_for_run(tok, str(tmp_path))
  assert json.load(open(tmp_path / "tokenizer.json"))["special_ids"] == {"pad_id": 5, "bos_id": 4, "eos_id": 5}
  again = tokenizer_lib.load_for_run(str(tmp_path))
  assert (again.bos_id, again.eos_id, again.name) == (4, 5, tok.name)
  stream = packing.from_documents(again.encode_batch(texts[:2]), 0, again.bos_id, again.eos_id, np.uint16)
  assert stream.tokens[0] == 4 and stream.tokens[stream.doc_starts[1] - 1] == 5
