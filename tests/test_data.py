import numpy as np
import pytest

from tests.conftest import corpus_for, tiny_config
from tpu_lm.data import local_files, pipeline, stream
from tpu_lm.data.layout import RowLayout
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


def _split(docs):
  return pipeline.Split.of_tokens(docs, bos_id=1, eos_id=2, num_bytes=[len(d) for d in docs])


def _one_stream(docs, seq_len, **kw):
  from tpu_lm.data import stream

  split = _split(docs)
  return stream.ShardStream(split.source, shard=0, num_shards=1, seq_len=seq_len, seed=0, bos_id=1, eos_id=2, **kw), \
      stream._fetcher(split.source, split.encoder)


def test_packing_predicts_every_target_once_and_never_across_documents():
  docs = [[10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40], []]
  s, fetch = _one_stream(docs, 5, shuffle=False, one_pass=True, with_bytes=True)
  rows = []
  while not s.done:
    rows.append(s.next_row(fetch))
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
    for seg_id in set(r["segment_ids"][r["segment_ids"] > 0]):
      pos = r["positions"][r["segment_ids"] == seg_id]
      assert list(pos) == list(range(len(pos)))
  assert rows[-1]["segment_ids"][-1] == 0  # the remainder is padding, weight 0
  assert sum(int(r["num_bytes"]) for r in rows) == sum(map(len, docs))  # each document's bytes once


def test_each_epoch_is_a_new_order_of_the_same_documents():
  docs = [[3 + i] * (i + 1) for i in range(9)]
  s, fetch = _one_stream(docs, 4)
  epochs = [[s.doc_index(e, p) for p in range(9)] for e in range(3)]
  assert all(sorted(e) == list(range(9)) for e in epochs) and epochs[0] != epochs[1]
  total_pairs = sum(len(d) + 1 for d in docs)
  seen = np.concatenate([s.next_row(fetch)["targets"] for _ in range(-(-total_pairs // 4))])[:total_pairs]
  assert s.state()[0] == 1  # rows are full: the last one may already start the next epoch
  assert sorted(int(t) for t in seen[seen > 2]) == sorted(t for d in docs for t in d)


def test_a_bounded_eval_samples_documents_in_a_seeded_order_and_scores_them_whatever_their_length():
  docs = [list(range(3, 3 + n)) for n in (5, 9, 2, 30, 4, 4, 40, 7)]
  s, fetch = _one_stream(docs, 8, shuffle=True, one_pass=True, with_bytes=True, max_rows=3)
  order = [s.doc_index(0, p) for p in range(len(docs))]
  rows = [s.next_row(fetch) for _ in range(3)]
  assert s.done and order != sorted(order)  # not the split's first documents
  # Every slot is scored, documents packed in the seeded order, the last one cut by the budget.
  pairs = [len(docs[i]) + 1 for i in order]
  whole = next(k for k in range(len(pairs) + 1) if sum(pairs[:k + 1]) > 24)
  cut = 24 - sum(pairs[:whole])
  assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == 24
  expected_bytes = sum(len(docs[i]) for i in order[:whole]) + (len(docs[order[whole]]) * cut / pairs[whole] if cut else 0)
  assert sum(float(r["num_bytes"]) for r in rows) == pytest.approx(expected_bytes)
  assert sum(int(r["num_docs"]) for r in rows) == whole + (cut > 0)
  # The same sample every time.
  again, fetch = _one_stream(docs, 8, shuffle=True, one_pass=True, with_bytes=True, max_rows=3)
  assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(rows, [again.next_row(fetch) for _ in range(3)]))


def test_a_bounded_eval_of_documents_longer_than_its_budget_still_scores_them():
  """The old rule (whole documents only) scored nothing here, and reported loss 0."""
  docs = [list(range(3, 50)), list(range(3, 60))]
  s, fetch = _one_stream(docs, 8, shuffle=True, one_pass=True, with_bytes=True, max_rows=2)
  rows = [s.next_row(fetch) for _ in range(2)]
  assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == 16 and sum(float(r["num_bytes"]) for r in rows) > 0


def test_an_eval_that_scores_nothing_is_an_error_not_a_perfect_score():
  import types

  from tpu_lm.tasks import causal_lm
  from tpu_lm.training import evaluate

  config = types.SimpleNamespace(data=types.SimpleNamespace(seq_len=8, global_batch_size=2, eval_split="validation",
                                                            dataset="text_files"), eval_max_batches=0)
  setup = types.SimpleNamespace(config=config, task=causal_lm.LanguageModel(), device_batch=lambda b: b)
  corpus = types.SimpleNamespace(validation=_split([[5, 6], [7]]))
  nothing = lambda params, batch: {"nats": 0.0, "tokens": 0.0, "bytes": 0.0, "documents": 0}  # noqa: E731
  with pytest.raises(UserError, match="scored nothing"):
    evaluate.evaluate(setup, None, corpus, eval_step=nothing)


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
  split = _split([list(range(3, 3 + n)) for n in range(20, 60)])
  kw = dict(seq_len=16, global_batch=8, seed=3)
  whole = pipeline.train_iter(split, **kw)
  halves = [pipeline.train_iter(split, **kw, process_index=i, process_count=2) for i in range(2)]
  for _ in range(5):
    g = next(whole)
    parts = [next(h) for h in halves]
    for k in g:
      np.testing.assert_array_equal(g[k], np.concatenate([p[k] for p in parts]))
  # The global state is every row's: the halves' states, stacked.
  np.testing.assert_array_equal(whole.get_state(), np.concatenate([h.get_state() for h in halves]))


def test_iterator_state_resumes_exactly_on_another_process_count():
  split = _split([list(range(3, 3 + n)) for n in range(5, 45)])
  it = pipeline.train_iter(split, seq_len=16, global_batch=4, seed=0)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it)["inputs"] for _ in range(30)]  # runs past an epoch boundary
  fresh = pipeline.train_iter(split, seq_len=16, global_batch=4, seed=0)
  fresh.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(fresh)["inputs"], e)
  halves = [pipeline.train_iter(split, seq_len=16, global_batch=4, seed=0, process_index=i, process_count=2)
            for i in range(2)]
  for h in halves:
    h.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(np.concatenate([next(h)["inputs"] for h in halves]), e)


def test_text_files_are_read_in_place(corpus_dir, data_dir):
  config = tiny_config(corpus_dir, data_dir)
  corpus = corpus_for(config)
  assert len(corpus.train) + len(corpus.validation) == 24
  assert 0 < corpus.zlib_bits_per_byte < 8
  batches = []
  for batch, done in pipeline.eval_batches(corpus.validation, seq_len=32, global_batch=8):
    batches.append(batch)
    if done:  # (the rows go on as padding until every process is done)
      break
  text = b"".join(open(f"{corpus_dir}/{p}", "rb").read() for p in corpus.validation.source.relpaths)
  assert sum(int(b["num_bytes"].sum()) for b in batches) == len(text)


def test_the_tokenizer_is_trained_on_a_seeded_sample_the_same_everywhere(corpus_dir, tmp_path):
  """Two machines without a shared disk (two data_dirs) train the same vocabulary."""
  names = []
  for d in ("host0", "host1"):
    config = tiny_config(corpus_dir, str(tmp_path / d))
    config.data.update(tokenizer="sentencepiece", vocab_size=300, tokenizer_sample_mb=0.01)
    names.append(corpus_for(config).tokenizer.name)
  assert names[0] == names[1]
  config.data.tokenizer_sample_mb = 1.0  # another sample, another vocabulary (and cache file)
  assert corpus_for(config).tokenizer.name != names[0]


def test_unknown_dataset_and_empty_directory_are_user_errors(tmp_path, data_dir):
  config = tiny_config(str(tmp_path / "empty"), data_dir)
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="matches no files"):
    corpus_for(config)
  config.data.dataset = "no_such_dataset_anywhere"
  with pytest.raises(UserError, match="neither"):
    corpus_for(config)


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
  from tpu_lm.data import documents, encode

  split = pipeline.Split(documents.TokenSource(again.encode_batch(texts[:1])), encode.Encoder(None), again.bos_id,
                         again.eos_id)
  row = next(pipeline.train_iter(split, seq_len=256, global_batch=1, seed=0))
  assert row["inputs"][0, 0] == 4 and 5 in row["targets"][0]


def test_a_tfrecord_prepared_split_reads_by_index(tmp_path):
  """Catalog datasets such as C4 come prepared as TFRecord: read in that format."""
  import tensorflow_datasets as tfds

  from tpu_lm.data import documents

  class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(50):
        yield i, {"text": f"document {i} " * (i % 7 + 1)}

  b = Tiny(data_dir=str(tmp_path), file_format="tfrecord")
  b.download_and_prepare()
  expected = [r["text"] for r in tfds.as_numpy(b.as_dataset(split="train", shuffle_files=False))]
  source = documents.TFRecordSource(b, "train")
  assert len(source) == 50
  order = [7, 0, 49, 7, 23]
  assert [r["text"] for r in source.get(order)] == [expected[i] for i in order]
  again = documents.TFRecordSource(b, "train")  # the offsets index is kept beside each file
  assert [r["text"] for r in again.get([3])] == [expected[3]] and list(tmp_path.rglob("*.tpu_lm_index.npy"))


def test_a_bucket_path_holds_the_tokenizer_and_the_metrics():
  """gs:// and other URLs go through TensorFlow's file system (ram:// stands in here)."""
  from tpu_lm import storage
  from tpu_lm.training import metrics

  tok = tokenizer_lib.load_or_train("ram://tfds/tpu_lm/spm.model", 300, ["some text to learn from " * 50] * 40)
  assert storage.exists("ram://tfds/tpu_lm/spm.model")
  assert tokenizer_lib.load_or_train("ram://tfds/tpu_lm/spm.model", 300, []).name == tok.name  # cached there
  tokenizer_lib.save_for_run(tok, "ram://run")
  assert tokenizer_lib.load_for_run("ram://run").name == tok.name
  w = metrics.Writer("ram://run")
  for step in (1, 2, 3):
    w.write(step, {"loss": 1.0 / step})
  w.close()
  resumed = metrics.Writer("ram://run", resume_step=2)  # a resumed run drops what came after its checkpoint
  resumed.write(3, {"loss": 0.5})
  with storage.open("ram://run/metrics.jsonl") as f:
    assert [line.count('"step"') for line in f] == [1, 1, 1]


def test_training_rows_of_a_block_come_in_a_shuffled_order_and_cover_every_target_once():
  from tpu_lm.data import stream

  docs = [list(range(3 + 100 * i, 3 + 100 * i + 20 + 7 * i)) for i in range(6)]
  split = _split(docs)
  s = stream.BlockStream(split.source, shard=0, num_shards=1, seq_len=8, seed=0, bos_id=1, eos_id=2, block_docs=3)
  fetch = stream._fetcher(split.source, split.encoder)
  rows = []
  while s.state()[0] == 0:  # one epoch
    rows.append(s.next_row(fetch))
  pairs = sorted((int(i), int(t)) for r in rows for i, t, g in zip(r["inputs"], r["targets"], r["segment_ids"]) if g)
  assert pairs == sorted((d[j], d[j + 1]) for doc in docs for d in [[1, *doc, 2]] for j in range(len(d) - 1))
  # The same rows as packing each block in order, but not in that order.
  order = [s._docs.doc_index(0, p) for p in range(6)]
  packed = []
  for b in range(2):
    framed = [np.array([1, *docs[i], 2]) for i in order[3 * b: 3 * b + 3]]
    block = stream._Block(framed, [np.ones(len(f), np.int32) for f in framed], 8)
    packed += [block.row(r, False)["inputs"].tolist() for r in range(block.num_rows)]
  emitted = [r["inputs"].tolist() for r in rows]
  assert sorted(emitted) == sorted(packed) and emitted != packed


def test_a_saved_position_is_checked_against_the_batch_and_block_size():
  from tpu_lm.training import checkpoint

  split = _split([list(range(3, 3 + n)) for n in range(5, 45)])
  it = pipeline.train_iter(split, seq_len=16, global_batch=4, seed=0, block_docs=4)
  next(it)
  saved = checkpoint._gathered_position(it)
  np.testing.assert_array_equal(checkpoint._position(saved, it), it.get_state())
  with pytest.raises(UserError, match=r"global batch 8: resume with the data.global_batch_size it was trained with"):
    checkpoint._position(saved, pipeline.train_iter(split, seq_len=16, global_batch=8, seed=0, block_docs=4))
  with pytest.raises(UserError, match=r"resume with --config.data.shuffle_block_docs=4, or use a new --workdir"):
    checkpoint._position(saved, pipeline.train_iter(split, seq_len=16, global_batch=4, seed=0))


def test_sample_prompts_are_as_many_as_asked_zero_included():
  split = _split([list(range(3, 40))] * 5)
  assert pipeline.first_tokens(split, 2, 8).shape == (2, 8)
  assert pipeline.first_tokens(split, 0, 8).shape == (0, 8)  # sample.num_prompts=0 printed every document's


def test_runs_that_start_together_build_a_dataset_once_not_over_each_other(tmp_path):
  """Two runs side by side (a sweep's trials, the encoder experiment's fine-tunes) both
  opened a dataset that was not built yet: one build renamed its folder over the
  other's and that run died with FileExistsError. Builds now take turns."""
  import concurrent.futures
  import json

  from tpu_lm.data import sources

  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps({"prompt": f"q{i} ", "completion": f"a{i}"}) + "\n" for i in range(400)))
  config = tiny_config()
  config.data.update(dataset="instructions", path=str(path), data_dir=str(tmp_path / "tfds"))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    splits = list(pool.map(lambda _: sources.open_splits(config.data), range(4)))
  assert len({len(s.train) for s in splits}) == 1 and len(splits[0].train) > 0


@pytest.mark.parametrize("layout", [RowLayout(), RowLayout(loss_mask=True), RowLayout(one_per_row=True)],
                         ids=["packed", "loss_mask", "classifier"])
def test_a_layout_names_every_field_of_its_rows(layout):
  """What --compile_for compiles a step for is what the stream makes."""
  split = pipeline.Split.of_tokens([[5, 6, 7, 8, 9]] * 8)
  loader = stream.Loader(split.source, split.encoder, seq_len=8, global_batch=4, seed=0, bos_id=1, eos_id=2,
                         one_per_row=layout.one_per_row, loss_mask=layout.loss_mask)
  batch = next(loader)
  loader.close()
  assert ({k: (v.shape[1:], v.dtype) for k, v in batch.items()}
          == {k: (s, np.dtype(d)) for k, (s, d) in layout.row_fields(8).items()})
