"""The reading objective (tasks/reading.py): an image of a line, then the line; rows,
resume, eval scores, the config's rules and a whole run."""

import base64

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


def _first_batch(tok, objective, rows=4):
  loader = stream.Loader(_source(), encode.Encoder(tok, objective, randomize=True), seq_len=40, global_batch=rows,
                         seed=3, bos_id=tok.bos_id, eos_id=tok.eos_id, **objective.layout.__dict__)
  batch = next(loader)
  loader.close()
  return batch


def test_a_row_is_the_image_then_bos_and_the_line_which_alone_is_scored():
  tok, objective = ByteTokenizer(), _reading()
  batch = _first_batch(tok, objective)
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


def test_the_layout_names_every_field_of_a_row_with_its_shape():
  tok, objective = ByteTokenizer(), _reading()
  batch = _first_batch(tok, objective)
  fields = objective.layout.row_fields(40)  # what --compile_for compiles the step for
  assert {k: (v.shape[1:], v.dtype) for k, v in batch.items()} == {k: (s, np.dtype(d)) for k, (s, d) in fields.items()}


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
    ({"vision.image_height": 36}, "does not cut into 32x8-pixel patches"),
    ({"data.seq_len": 40}, "the image takes 32 positions"),
    ({"reading.max_font": 30}, "does not fit 32 pixels"),
    ({"reading.source": "web"}, "use one of 'render', 'images'"),
    ({"reading.text_share": 1.0}, "the share of training examples without an image"),
    ({"reading.source": "images", "reading.text_share": 0.5}, "reading.source='images' reads an image dataset"),
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


class _StubRun:
  """What parse_request reads of a run that reads images (no model: nothing decodes)."""

  def __init__(self, vision=True):
    from types import SimpleNamespace

    from tpu_lm.model.vision import VisionConfig

    self.tokenizer = ByteTokenizer()
    self.objective = _reading()
    cfg = VisionConfig(image_height=SHAPE[0], image_width=SHAPE[1], out_dim=8) if vision else None
    self.decoder = SimpleNamespace(cfg=SimpleNamespace(vision=cfg), vocab_size=self.tokenizer.vocab_size,
                                   check=lambda *a: None)
    self.config = None

  def encode_prompt(self, text):
    return [self.tokenizer.bos_id, *self.tokenizer.encode_batch([text])[0]]


def _png(text="x = 1"):
  import io

  from PIL import Image

  buffer = io.BytesIO()
  Image.fromarray(render.render(text, np.random.default_rng(0))).save(buffer, format="PNG")
  return buffer.getvalue()


def _chat(*parts):
  import json

  return json.dumps({"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}).encode()


def _huge_png() -> bytes:
  """A PNG whose header claims 20000 x 20000 pixels: tiny to send, gigabytes to unpack."""
  import struct
  import zlib

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _image_part(url):
  return {"type": "image_url", "image_url": {"url": url}}


def test_chat_image_parts_become_the_pixels_read_before_the_prompt():
  from tpu_lm.serving import requests

  limits = requests.Limits(max_prompt_tokens=64, max_new_tokens=16, max_body_bytes=1 << 20, timeout_s=10, max_batch=4)
  url = "data:image/png;base64," + base64.b64encode(_png()).decode()
  request = requests.parse_request(_chat({"type": "text", "text": "ab"}, _image_part(url)), _StubRun(), limits,
                                   chat=True)
  [image] = request.images
  assert image.shape == SHAPE and image.dtype == np.uint8 and image.std() > 10
  tok = ByteTokenizer()
  assert request.ids[0] == [0] * SLOTS + [tok.bos_id, *tok.encode_batch(["ab"])[0]]
  assert request.lead == [SLOTS + 1]  # the image and BOS are context, not prompt tokens


@pytest.mark.parametrize("parts, vision, message", [
    ([_image_part("https://example.com/cat.png")], True, "this server fetches nothing"),
    ([_image_part("data:image/png;base64,@@@")], True, "the image cannot be read"),
    ([_image_part("data:image/png;base64," + "aGVsbG8=")], True, "not an image file Pillow can read"),
    ([_image_part("data:,x")], True, "must be base64"),
    ([_image_part("data:image/png;base64," + base64.b64encode(_huge_png()).decode())], True,
     "an image larger than Pillow opens"),
    ([{"type": "audio", "data": "x"}], True, "must be a {\"type\": \"text\""),
    ([_image_part("data:image/png;base64," + base64.b64encode(_png()).decode())] * 2, True,
     "holds 2 images; this model reads one"),
    ([_image_part("data:image/png;base64,AAAA")], False, "this model reads no images"),
])
def test_bad_image_parts_are_refused_in_one_line(parts, vision, message):
  from tpu_lm.serving import requests
  from tpu_lm.serving.body import RequestError

  limits = requests.Limits(max_prompt_tokens=64, max_new_tokens=16, max_body_bytes=1 << 20, timeout_s=10, max_batch=4)
  run = _StubRun(vision)
  if not vision:
    run.objective = type("Chat", (), {"chat": True, "chat_prompt": lambda self, m: m[-1]["content"]})()
  with pytest.raises(RequestError, match=message) as e:
    requests.parse_request(_chat(*parts), run, limits, chat=True)
  assert e.value.status == 400


@pytest.fixture(scope="module")
def reading_run(corpus_dir, data_dir, tmp_path_factory):
  from tpu_lm.training import loop

  workdir = str(tmp_path_factory.mktemp("reading") / "run")
  config = _tiny_reading(corpus_dir, data_dir)
  config.update(num_train_steps=4, eval_every_steps=100)
  loop.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow  # a server, the generate command and inspect on a trained reading run
def test_generate_the_server_and_inspect_read_an_image_as_the_decoder_does(reading_run, tmp_path, capsys):
  import json

  import jax

  from tests.conftest import cli_body
  from tests.test_serve import AUTH, KEY, _post, _start
  from tpu_lm.inference import decode, run_dir

  png_path = tmp_path / "line.png"
  png_path.write_bytes(_png("x = 1"))
  run = run_dir.load(reading_run, devices=jax.devices()[:1])
  pixels = reading.decode_image(_png("x = 1"), SHAPE)
  prompt = reading.image_prompt(SLOTS, run.encode_prompt(""))
  [expected] = run.decoder.generate([prompt], decode.Sampling(8, 0.0), images=[pixels])
  text = run.tokenizer.decode(expected.tokens)
  # The image reaches the decoder: a blank one gives other next-token logits.
  logits = lambda image: decode.prefill(run.decoder.model, run.decoder.params, np.array([prompt]),  # noqa: E731
                                        np.array([len(prompt)]), len(prompt), image[None], np.array([True]))[1]
  assert float(np.abs(logits(pixels) - logits(np.zeros(SHAPE, np.uint8))).max()) > 1e-4

  cli_body("generate", [f"--workdir={reading_run}", f"--image={png_path}", "--temperature=0", "--max_new_tokens=8"])
  assert capsys.readouterr().out.startswith(text)

  proc, port = _start(reading_run, env={"TPU_LM_API_KEY": KEY})
  try:
    url = "data:image/png;base64," + base64.b64encode(_png("x = 1")).decode()
    body = {"messages": [{"role": "user", "content": [_image_part(url)]}], "max_tokens": 8, "temperature": 0}
    status, data = _post(port, body, "/v1/chat/completions", headers=AUTH)
    assert status == 200, data
    assert json.loads(data)["choices"][0]["message"]["content"] == text
    body["messages"][0]["content"] = [_image_part("http://example.com/a.png")]
    status, data = _post(port, body, "/v1/chat/completions", headers=AUTH)
    assert status == 400 and "this server fetches nothing" in data
    # Text alone is scored left to right and embedded, as for any decoder.
    status, data = _post(port, {"prompt": "x = 1", "echo": True, "logprobs": 1, "max_tokens": 0}, headers=AUTH)
    assert status == 200 and len(json.loads(data)["choices"][0]["logprobs"]["token_logprobs"]) == 5, data
    status, data = _post(port, {"input": "x = 1"}, "/v1/embeddings", headers=AUTH)
    assert status == 200, data
  finally:
    proc.terminate()
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()

  cli_body("inspection", [f"--workdir={reading_run}", f"--image={png_path}", f"--out={tmp_path / 'inspect'}"])
  out = capsys.readouterr().out
  assert "image_attention.png" in out and (tmp_path / "inspect" / "image_attention.png").stat().st_size > 1000


@pytest.mark.slow  # a LoRA fine-tune of the reading run and an int8 copy of it
def test_the_held_out_reading_a_run_reports_is_its_saved_models_lora_merged_or_quantized(reading_run, corpus_dir,
                                                                                       data_dir, tmp_path):
  import jax

  from tpu_lm.data import sources
  from tpu_lm.inference import run_dir
  from tpu_lm.model import quant
  from tpu_lm.training import compression, loop, prune

  def read(workdir, n):
    run = run_dir.load(workdir, devices=jax.devices()[:1])
    records = sources.open_splits(run.config.data).validation.get(list(range(n)))
    texts, truth = run.objective.transcribe(run.decoder, run.tokenizer, records, run.config.data.seq_len - SLOTS - 1)
    return reading.reading_scores(texts, truth)["eval_cer"], texts

  config = _tiny_reading(corpus_dir, data_dir)
  config.update(num_train_steps=3, eval_every_steps=100, init_from=reading_run)
  config.lora.rank, config.lora.targets = 4, "layers_.*"
  config.optim.learning_rate = 0.05  # adapters large enough to change what the decoder reads
  result = loop.train_and_evaluate(config, str(tmp_path / "lora"))
  n = result["eval_read_examples"]
  cer, texts = read(str(tmp_path / "lora"), n)
  assert texts != read(reading_run, n)[1]  # the adapters matter: read without them, the eval would differ
  assert result["eval_cer"] == cer

  out = str(tmp_path / "int8")
  done = compression.compress(reading_run, out, quant_spec=quant.Spec(weight_qtype="int8"), prune_spec=prune.Spec())
  assert done.compressed["eval_cer"] == read(out, n)[0]


def test_an_image_text_dataset_is_read_as_it_is_with_captions_or_class_labels():
  tok = ByteTokenizer()
  rng = np.random.default_rng(0)
  photos = [{"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": i % 2,
             "captions": {"text": np.array([b"a red square", b"something red"])}} for i in range(3)]
  labelled = _reading(source="images", caption_template="a photo of a {label}", class_names=("cat", "dog_house"))
  encoded = labelled.encode(photos, tok)
  assert [tok.decode(e.ids) for e in encoded] == ["a photo of a cat", "a photo of a dog house", "a photo of a cat"]
  assert encoded[0].image.shape == SHAPE and encoded[0].image_slots == SLOTS
  captioned = _reading(source="images", text_key="captions")
  assert tok.decode(captioned.encode(photos[:1], tok)[0].ids) == "a red square"  # held out: the first caption
  drawn = {tok.decode(captioned.encode(photos[:1], tok, [np.random.default_rng(s)])[0].ids) for s in range(8)}
  assert drawn == {"a red square", "something red"}  # training: any of them
  assert captioned.features() == [("reading.image_key", "image"), ("data.text_key", "captions")]


@pytest.mark.slow  # transformers loads the exported decoder
def test_the_exported_decoder_scores_text_as_the_run_does_and_the_vision_half_is_saved_beside_it(reading_run,
                                                                                                  tmp_path):
  import jax
  import torch
  import transformers

  from tpu_lm.inference import run_dir
  from tpu_lm.interop import hf, safetensors_io

  message = hf.export_model(reading_run, str(tmp_path / "hf"))
  assert "vision_encoder.safetensors" in message
  run = run_dir.load(reading_run, devices=jax.devices()[:1])
  ids = run.encode_prompt("x = 1 + 2")
  t = len(ids)
  ours = run.decoder.model.apply({"params": run.decoder.params}, np.array([ids]), np.ones((1, t), np.int32),
                                 np.arange(t)[None], prefix_BxT=np.arange(t)[None] < 1)  # BOS alone: causal
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0].numpy()
  vocab = theirs.shape[-1]
  np.testing.assert_allclose(np.asarray(ours[0, :, :vocab]), theirs, atol=2e-4)
  saved = safetensors_io.read_file(str(tmp_path / "hf" / "vision_encoder.safetensors"))
  projector = run.decoder.params["vision_encoder"]["projector"]["kernel"]
  np.testing.assert_array_equal(saved["projector/kernel"], np.asarray(projector))


@pytest.mark.slow  # libtpu compiles the step for a TPU slice
def test_the_reading_config_compiles_for_a_tpu_slice():
  from tpu_lm.training import aot

  report = aot.compile_for(_reading_config(), "v5p-8")
  assert report.fits and report.num_params > 1_000_000


def test_mixed_batches_hold_text_only_rows_scored_as_a_language_model():
  tok, objective = ByteTokenizer(), _reading(text_share=0.5)
  batch = _first_batch(tok, objective, rows=8)
  text_rows = np.flatnonzero(~batch["image_row"])
  assert 0 < len(text_rows) < 8  # both kinds in one batch
  for r in text_rows:
    assert batch["inputs"][r][0] == tok.bos_id and (batch["image"][r] == 0).all()
    assert batch["prefix"][r].sum() == 1  # BOS alone: the text is causal
    real = batch["segment_ids"][r] > 0
    np.testing.assert_array_equal(batch["loss_mask"][r], real.astype(np.int32))  # every token scored
  held_out = objective.encode(_source().get([0, 1]), tok)  # eval: always the image
  assert all(e.image is not None for e in held_out)


@pytest.mark.slow  # two compiles of the train step
def test_a_reading_model_trains_on_a_mesh_as_on_one_device(corpus_dir, data_dir):
  """The vision encoder and projector shard by their rules, and images split by rows with
  the batch: the same losses, gradient norms and parameters as one device."""
  import jax

  from tests.conftest import train_steps
  from tpu_lm import tasks

  config = _tiny_reading(corpus_dir, data_dir)
  tok, objective = ByteTokenizer(), tasks.from_config(config)
  loader = stream.Loader(_source(), encode.Encoder(tok, objective, randomize=True), seq_len=32, global_batch=8,
                         seed=0, bos_id=tok.bos_id, eos_id=tok.eos_id, **objective.layout.__dict__)
  batches = [next(loader) for _ in range(3)]
  loader.close()
  one = train_steps(config, batches, jax.devices()[:1])
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = train_steps(config, batches, jax.devices())
  np.testing.assert_allclose(mesh[0], one[0], rtol=1e-5)
  np.testing.assert_allclose(mesh[1], one[1], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), mesh[2].params, one[2].params)
  assert "vision_encoder" in one[2].params
