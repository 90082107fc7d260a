"""Token classification: what each token of Python source is (tasks/tagging.py)."""

import os
import random

import numpy as np
import pytest

from tests.conftest import WORDS, tiny_config
from tpu_lm.data import encode
from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.tasks import tagging

SOURCE = 'def f(x):  # add\n    return x + 1.5 if x else "é"\n'


def _names(tags):
  return [tagging.TAGS[t] for t in tags]


def test_each_byte_and_token_takes_the_class_pythons_tokenizer_gives_it():
  tok = tokenizer_lib.ByteTokenizer()
  [e] = encode.Encoder(tok, tagging.TokenTagger())([{"text": SOURCE}])
  np.testing.assert_array_equal(e.inputs, tok.encode_batch([SOURCE])[0])  # reads the text
  by_char = {}
  data = SOURCE.encode()
  for i, tag in enumerate(_names(e.ids)):  # one byte a token: the tag of each byte
    by_char.setdefault(data[i:i + 1].decode(errors="replace"), set()).add(tag)
  assert _names(e.ids[:4]) == ["keyword"] * 3 + ["space"]  # "def "
  assert _names(e.ids[4:6]) == ["name", "operator"]  # "f("
  assert by_char["#"] == {"comment"} and by_char["+"] == {"operator"} and by_char["."] == {"number"}
  assert by_char["\""] == {"string"} and by_char["\n"] == {"space"}
  assert _names(e.ids[-4:-1]) == ["string"] * 3  # "é" is two bytes of the string
  assert e.weights.all()
  [bad] = encode.Encoder(tok, tagging.TokenTagger())([{"text": "def f(:\n  'open"}])
  assert not bad.weights.any()  # Python cannot tokenize it: read, not scored


def test_sentencepiece_tokens_are_placed_by_their_bytes():
  rng = random.Random(0)
  texts = [" ".join(rng.choice(WORDS) for _ in range(12)) + " = f(1, 'x')  # é\n" for _ in range(200)]
  tok = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(texts, 300))
  lengths = tokenizer_lib.byte_lengths(tok)
  for text in texts[:20] + [SOURCE]:
    ids = tok.encode_batch([text])[0]
    assert lengths[ids].sum() == len(text.encode())  # lossless: the pieces' bytes are the text's
  ids = tok.encode_batch([SOURCE])[0]
  tags = tagging.token_tags(ids, tagging.byte_tags(SOURCE), lengths)
  pieces = [tok.decode([i]) for i in ids]
  for piece, tag in zip(pieces, _names(tags)):
    if piece.strip() == "return":
      assert tag == "keyword"
    if piece.strip().startswith("#"):
      assert tag == "comment"


@pytest.mark.slow  # a training run
def test_a_tagger_trains_and_reports_per_class_metrics(tmp_path, data_dir):
  from tpu_lm.training import loop

  corpus = tmp_path / "src"
  corpus.mkdir()
  rng = random.Random(0)
  for i in range(24):
    lines = [f"def {rng.choice(WORDS)}_{j}(x, y=1):\n    return x + {j} * y  # {rng.choice(WORDS)}\n"
             for j in range(rng.randint(5, 15))]
    (corpus / f"m{i}.py").write_text("".join(lines))
  config = tiny_config(str(corpus), data_dir)
  config.task.kind = "tagging"
  config.num_train_steps = 12
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert set(result["eval_per_class"]) == set(tagging.TAGS)
  assert result["eval_tokens"] > 0 and 0 < result["eval_accuracy"] <= 1
  majority = max(c["support"] for c in result["eval_per_class"].values()) / result["eval_tokens"]
  assert result["eval_accuracy"] > majority  # it learned more than the commonest class
  assert os.path.exists(tmp_path / "run" / "metrics.jsonl")
