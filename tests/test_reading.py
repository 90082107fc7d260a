"""The reading objective (tasks/reading.py): an image of a line, then the line; rows,
resume, eval scores, the config's rules and a whole run."""

import numpy as np
import pytest

from tests.conftest import rows_resumed, tiny_config
from tpu_lm.data import encode, render, stream
from tpu_lm.data.tokenizer import ByteTokenizer
from tpu_lm.tasks import reading

SHAPE = (16, 64, 1)
SLOTS = 16  # 8-pixel patches: 2 x 8


def _reading(**fields):
  return reading.Reading(image_shape=SHAPE, image_slots=SLOTS, difficulty=render.Difficulty(16, 64, 8, 10, 2, 0.05),
                         min_chars=4, **fields)


def _source(n=40):
  return type("Docs", (), {"__len__": lambda self: n, "get": lambda self, idx: [
      {"text": f"import mod{i}\n\n    x = {i} + 1\nprint(x, {i})\n"} for i in idx]})()


def test_a_row_is_the_image_then_bos_and_the_line_which_alone_is_scored():
  tok, objective = ByteTokenizer(), _reading()
  loader = stream.Loader(_source(), encode.Encoder(tok, objective, randomize=True), seq_len=40, global_batch=4,
                         seed=3, bos_id=tok.bos_id, eos_id=tok.eos_id, **objective.layout.__dict__)
  batch = next(loader)
  loader.close()
  assert batch["image"].shape == (4, *SHAPE) and batch["image"].dtype == np.uint8 and batch["image_row"].all()
  for r in range(4):
    inputs, targets, mask, prefix = (batch[k][r] for k in ("inputs", "targets", "loss_mask", "prefix"))
    assert inputs[SLOTS] == tok.bos_id
    np.testing.assert_array_equal(prefix, np.arange(40) < SLOTS + 1)  # the image and BOS, read both ways
    scored = np.flatnonzero(mask)
    assert scored[0] == SLOTS  # BOS predicts the first character; nothing reading the image is scored
    text = tok.decode(targets[scored][:-1])  # the last target is EOS
    assert targets[scored][-1] == tok.eos_id and len(text) >= 4
    lines = [line.strip() for d in _source().get(range(40)) for line in d["text"].splitlines()]
    assert any(line.startswith(text) for line in lines)  # a line, as much of it as the canvas shows
    np.testing.assert_array_equal(inputs[SLOTS + 1: scored[-1] + 1], targets[scored][:-1])  # pairs: input, next
    assert batch["image"][r].std() > 10  # a drawing, not a blank


def test_image_rows_resume_exactly_and_training_draws_anew_each_epoch():
  tok, objective = ByteTokenizer(), _reading()
  rest, again = rows_resumed(tok, encode.Encoder(tok, objective, randomize=True), **objective.layout.__dict__)
  for a, b in zip(rest, again):
    assert a.keys() == b.keys() and "image" in a
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  record = _source().get([5])[0]
  epochs = [objective.example(record, np.random.default_rng([7, e, 5])) for e in range(4)]
  assert len({text for text, _ in epochs}) > 1 or len({im.tobytes() for _, im in epochs}) > 1
  held_out = [objective.example(record, None) for _ in range(2)]  # validation: the same every time
  assert held_out[0][0] == held_out[1][0] and (held_out[0][1] == held_out[1][1]).all()


def test_a_line_is_cut_where_the_canvas_ends_and_short_lines_are_skipped():
  objective = _reading()
  text = "ab\n" + "x" * 200 + "\n"
  line = objective.line(text, np.random.default_rng(0))
  assert line == "x" * render.fits("x" * 200, 10, objective.difficulty) and 0 < len(line) < 200
  assert objective.line("a\nb\n", np.random.default_rng(0)) == "a b"  # no line long enough: the text, collapsed


def test_character_error_rate_and_exact_lines():
  assert reading.edit_distance("kitten", "sitting") == 3
  assert reading.edit_distance("", "abc") == 3 and reading.edit_distance("abc", "abc") == 0
  scores = reading.reading_scores(["abc", "abd", ""], ["abc", "abc", "xy"])
  assert scores["eval_cer"] == pytest.approx((0 + 1 + 2) / 8) and scores["eval_exact"] == pytest.approx(1 / 3)


def test_any_image_is_fitted_to_the_models_size_and_channels():
  rgb = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  assert reading.fit_image(rgb, (16, 64, 1)).shape == (16, 64, 1)
  assert reading.fit_image(rgb[..., 0], (8, 8, 3)).shape == (8, 8, 3)
  with pytest.raises(ValueError, match="uint8"):
    reading.fit_image(rgb.astype(np.float32), SHAPE)


def _reading_config(**overrides):
  from configs import reading as reading_config

  c = reading_config.get_config()
  for dotted, value in overrides.items():
    node, *rest = dotted.split(".")
    c[node][rest[0]] = value
  return c


@pytest.mark.parametrize("overrides, message", [
    ({"vision.image_height": 0, "vision.image_width": 0}, "vision.image_height is 0: task.kind=.reading. reads images"),
    ({"task.kind": "lm"}, "the lm objective reads no images"),
    ({"vision.image_width": 0}, "give the images both a height and a width"),
    ({"vision.image_height": 36}, "does not cut into 8-pixel patches"),
    ({"data.seq_len": 130}, "the image takes 128 positions"),
    ({"reading.max_font": 30}, "does not fit 32 pixels"),
    ({"reading.source": "web"}, "use one of 'render', 'images'"),
])
def test_impossible_reading_settings_are_refused_in_one_line(overrides, message):
  from tpu_lm.config import checks
  from tpu_lm.errors import UserError

  with pytest.raises(UserError, match=message):
    checks.validate(_reading_config(**overrides))


def _tiny_reading(corpus_dir, data_dir):
  c = tiny_config(corpus_dir, data_dir)
  c.task.kind = "reading"
  c.vision.image_height, c.vision.image_width, c.vision.patch = 16, 64, 8
  c.vision.d_model, c.vision.num_heads, c.vision.mlp_dim, c.vision.num_layers = 16, 2, 32, 1
  c.reading.min_font, c.reading.max_font, c.reading.max_offset, c.reading.min_chars = 8, 10, 2, 4
  c.reading.eval_examples = 4
  c.data.seq_len, c.model.max_len = 32, 32  # 16 image positions, BOS, 15 for text
  c.sample.num_prompts = 0
  c.data.tokenizer = "bytes"
  return c


@pytest.mark.slow  # two short runs: compiles the train step, eval and the image decoder
def test_a_reading_run_reads_held_out_images_and_resumes_exactly(corpus_dir, data_dir, tmp_path):
  import shutil

  from tpu_lm.training import loop

  config = _tiny_reading(corpus_dir, data_dir)
  config.update(num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=100)
  whole = loop.train_and_evaluate(config, str(tmp_path / "whole"))
  assert 0 <= whole["eval_exact"] <= 1 and whole["eval_cer"] > 0 and 0 < whole["eval_read_examples"] <= 4
  assert whole["eval_tokens"] > 0
  # Stopped after step 3 (its checkpoint kept, 6's gone) and run again: the same run.
  loop.train_and_evaluate(config, str(tmp_path / "cut"))
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")
  resumed = loop.train_and_evaluate(config, str(tmp_path / "cut"))
  for key in ("eval_loss", "eval_token_accuracy", "eval_cer"):
    assert resumed[key] == whole[key], key
