"""Reading: a vision-language model's objective. Each example is an image followed by its
text, the text's tokens the only targets; the image, BOS and any prompt are the prefix,
read both ways (PaliGemma's prefix LM), the text after them causal.

Where the images come from (`reading.source`):
- "render" (the offline default): a line of each document of the text corpus (the
  standard library's Python by default), drawn as a picture on the fly (data/render.py:
  font size, offset and noise drawn per example, the config's `reading` section sets how
  hard). The target is the line: optical character recognition. A training document
  gives a different line, drawn differently, each epoch; all of it is drawn from the
  generator its key seeds (data/encode.py), so a resumed run reads the same pictures.
  A validation document always gives the same line and picture (seeded by its text).
- "images": the records' own image feature (`reading.image_key`, a TFDS image-text
  dataset such as coco_captions), resized to the model's image size; the target is the
  record's text (data.text_key), or its class label written into
  `reading.caption_template` ("a photo of a {label}" for cifar10).

Eval: the loss and next-token accuracy on the text; and the first `reading.eval_examples`
held-out examples read greedily from their images alone, scored by character error rate
(edits / reference characters) and exact-line accuracy (`transcribe`).
"""

import dataclasses
import math
import zlib

import numpy as np

from tpu_lm.data import render
from tpu_lm.data.encode import Encoded, as_text
from tpu_lm.data.layout import RowLayout
from tpu_lm.tasks import losses
from tpu_lm.tasks.causal_lm import LanguageModel

NAME = "reading"
METRICS = {"eval_loss": "minimize", "eval_token_accuracy": "maximize", "eval_cer": "minimize",
           "eval_exact": "maximize"}
SOURCES = ("render", "images")


@dataclasses.dataclass(frozen=True)
class Reading(LanguageModel):
  image_shape: tuple = (32, 256, 1)  # (height, width, channels)
  image_slots: int = 128  # the vision encoder's patches: positions the image takes before BOS
  difficulty: render.Difficulty = render.Difficulty()
  source: str = "render"
  image_key: str = "image"
  caption_template: str = ""
  class_names: tuple = ()
  label_key: str = "label"
  min_chars: int = 8  # lines shorter than this (stripped) are never drawn
  eval_examples: int = 64
  text_share: float = 0.0  # training examples that are text alone (a window of the document), no image
  chat_template: str = "{prompt}"  # the chat completions' prompt: the conversation's text as it stands

  name = NAME
  generates = True
  chat = True  # the server's chat completions take an image part (serving/images.py)
  attention = "prefix"
  records = "text"  # the tokenizer is the text corpus's: a text run's decoder can start this one (init_from)
  text_reference = False
  metrics = METRICS
  randomized = True  # training lines and their drawing come from a generator per record
  reads_images = True  # evaluation also reads held-out images greedily (`transcribe`)

  @property
  def layout(self):
    return RowLayout(one_per_row=True, loss_mask=True, image=tuple(self.image_shape))

  @property
  def labels(self):
    return bool(self.caption_template)

  def features(self) -> list[tuple[str, str]]:
    if self.source == "render":
      return [("data.text_key", self.text_key)]
    text = ("data.label_key", self.label_key) if self.caption_template else ("data.text_key", self.text_key)
    return [("reading.image_key", self.image_key), text]

  def sample_text(self, record) -> str:
    if self.source == "images":
      return self._caption(record) if self.caption_template else self._text(record[self.text_key], None)
    return as_text(record[self.text_key])

  # -- examples ------------------------------------------------------------------------------------------------------

  def line(self, text: str, rng: np.random.Generator) -> str:
    """The line of `text` an example reads: one of its lines of at least min_chars
    characters (stripped), cut to what the canvas shows at the largest font."""
    lines = [s for s in (raw.strip() for raw in text.splitlines()) if len(s) >= self.min_chars]
    if not lines:  # a document without such a line: its first characters, whitespace collapsed
      lines = [" ".join(text.split())[:80] or "pass"]
    chosen = lines[int(rng.integers(len(lines)))].replace("\t", " ")
    return chosen[: render.fits(chosen, self.difficulty.max_font, self.difficulty)].rstrip()

  @staticmethod
  def _text(value, rng) -> str:
    """A record's text: a string, or one of several (coco_captions' {"text": [five captions]}:
    a training example draws one, a held-out one reads the first)."""
    if isinstance(value, dict):
      value = value.get("text", next(iter(value.values()), ""))
    if isinstance(value, (list, tuple, np.ndarray)):
      if not len(value):
        return ""
      value = value[int(rng.integers(len(value)))] if rng is not None else value[0]
    return as_text(value)

  def _caption(self, record) -> str:
    label = int(record[self.label_key])
    name = self.class_names[label] if label < len(self.class_names) else str(label)
    return self.caption_template.replace("{label}", name.replace("_", " "))

  def example(self, record, rng: np.random.Generator | None) -> tuple[str, np.ndarray]:
    """(the text, the image [H, W, C] uint8) of a record; `rng` None: the validation
    form, seeded by the record's own text."""
    if self.source == "images":
      text = self._caption(record) if self.caption_template else self._text(record[self.text_key], rng)
      return text, fit_image(np.asarray(record[self.image_key]), self.image_shape)
    text = as_text(record[self.text_key])
    if rng is None:
      rng = np.random.default_rng(zlib.crc32(text.encode("utf-8")))
    line = self.line(text, rng)
    pixels = render.render(line, rng, self.difficulty)
    return line, np.repeat(pixels[..., None], self.image_shape[2], axis=-1)

  def text_window(self, record, rng: np.random.Generator) -> str:
    """A text-only example: the document's lines from a random one on (the row cuts it)."""
    lines = as_text(record[self.text_key]).splitlines(keepends=True)
    return "".join(lines[int(rng.integers(len(lines))):]) if lines else ""

  def encode(self, records, tokenizer, rngs=None) -> list[Encoded]:
    rngs = rngs or [None] * len(records)
    # Mixed batches: with text_share, a training example is text alone (read as a language
    # model reads it: image_row False, every token scored), keeping the decoder's text.
    text_only = [g is not None and self.text_share > 0 and g.random() < self.text_share for g in rngs]
    examples = [(self.text_window(r, g), None) if alone else self.example(r, g)
                for r, g, alone in zip(records, rngs, text_only)]
    ids = tokenizer.encode_batch([text for text, _ in examples])
    return [Encoded(np.asarray(i, np.int32), num_bytes=len(text.encode("utf-8")), image=image,
                    image_slots=self.image_slots if image is not None else 0)
            for i, (text, image) in zip(ids, examples)]

  def chat_prompt(self, messages) -> str:
    """The conversation's text as instruction tuning renders it (earlier turns folded above
    the last user message); the image goes before it (serving/images.py)."""
    from tpu_lm.tasks import instructions

    return instructions.Instructions.chat_prompt(self, messages)

  def check(self, config) -> None:
    from tpu_lm.config.checks import fail

    r = config.reading
    if r.source not in SOURCES:
      fail("reading.source", r.source, f"use one of {', '.join(map(repr, SOURCES))}")
    if not config.vision.image_height:
      fail("vision.image_height", 0, "task.kind='reading' reads images: give the model a vision encoder"
           " (vision.image_height and vision.image_width; configs/reading.py)")
    room = config.data.seq_len - self.image_slots - 2
    if room < 8:
      fail("data.seq_len", config.data.seq_len, f"the image takes {self.image_slots} positions and BOS one: make"
           f" it at least {self.image_slots + 10} to leave room for text, or use a smaller image or larger"
           " vision.patch")
    if r.source == "render":
      try:
        self.difficulty.check()
      except ValueError as e:
        fail("reading", f"{r.min_font}..{r.max_font} px, offset {r.max_offset}", f"{e}: change reading.min_font,"
             " max_font, max_offset or noise, or vision.image_height")
    if not 0 <= r.text_share < 1:
      fail("reading.text_share", r.text_share, "it is the share of training examples without an image: use a"
           " number in [0, 1)")
    if r.source == "images" and r.text_share:
      fail("reading.text_share", r.text_share, "text-only rows are windows of the text corpus's documents, and"
           " reading.source='images' reads an image dataset's captions: set it to 0 there")
    if r.source == "images" and r.caption_template and "{label}" not in r.caption_template:
      fail("reading.caption_template", r.caption_template, "it must contain {label}, e.g. 'a photo of a {label}'")

  # -- loss and eval -------------------------------------------------------------------------------------------------

  def eval_sums(self, model, params, batch) -> dict:
    return losses.scored_token_sums(model, params, batch)

  def eval_metrics(self, sums: dict) -> dict:
    nats, count = float(sums["nats"]), float(sums["tokens"])
    loss = nats / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50)),
            "eval_token_accuracy": float(sums["correct"]) / max(count, 1),
            "eval_tokens": int(count), "eval_documents": int(sums["documents"])}

  def transcribe(self, decoder, tokenizer, records, max_new_tokens: int) -> tuple[list[str], list[str]]:
    """(what the model reads, the reference) for each record's held-out example, greedily
    from its image and BOS alone."""
    from tpu_lm.inference.sampling import Sampling

    examples = [self.example(r, None) for r in records]
    prompt = image_prompt(self.image_slots, [tokenizer.bos_id])
    completions = decoder.generate([prompt] * len(examples), Sampling(max_new_tokens, 0.0),
                                   images=[image for _, image in examples])
    return [tokenizer.decode(c.tokens) for c in completions], [text for text, _ in examples]


def image_prompt(image_slots: int, prompt_ids: list[int]) -> list[int]:
  """A prompt read after an image: its placeholder positions (the image fills them),
  then the prompt's ids ([BOS] + text)."""
  return [0] * image_slots + list(prompt_ids)


def decode_image(data: bytes, shape: tuple) -> np.ndarray:
  """An image file's bytes (PNG, JPEG, anything Pillow reads) as the model's [H, W, C]
  uint8 pixels; ValueError saying why it cannot be read."""
  import io

  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(io.BytesIO(data)) as picture:
      picture.load()
      array = np.asarray(picture.convert("L" if shape[2] == 1 else "RGB"), np.uint8)
  except UnidentifiedImageError:
    raise ValueError("not an image file Pillow can read") from None
  except Image.DecompressionBombError:  # a small file that would unpack to gigabytes of pixels
    raise ValueError(f"an image larger than Pillow opens ({Image.MAX_IMAGE_PIXELS:,} pixels at most): send a"
                     " smaller picture") from None
  except (OSError, SyntaxError, ValueError) as e:  # a truncated or damaged file
    raise ValueError(f"a damaged image file ({e})") from None
  return fit_image(array, shape)


def fit_image(image: np.ndarray, shape: tuple) -> np.ndarray:
  """Any image ([H, W], [H, W, 1|3|4], uint8) as [height, width, channels] uint8: resized
  (bilinear, aspect not kept) and converted to grayscale or RGB."""
  from PIL import Image

  h, w, c = shape
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"an image of dtype {array.dtype}: expected uint8 pixels")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  picture = Image.fromarray(array).convert("L" if c == 1 else "RGB")
  if picture.size != (w, h):
    picture = picture.resize((w, h), Image.BILINEAR)
  out = np.asarray(picture, np.uint8)
  return out.reshape(h, w, c)


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance between two strings (insertions, deletions, substitutions)."""
  if len(a) < len(b):
    a, b = b, a
  previous = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    current = [i]
    for j, cb in enumerate(b, 1):
      current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
    previous = current
  return previous[-1]


def reading_scores(read: list[str], references: list[str]) -> dict:
  """Character error rate (all edits over all reference characters) and exact-line accuracy."""
  edits = sum(edit_distance(r, ref) for r, ref in zip(read, references))
  chars = sum(len(ref) for ref in references)
  exact = sum(r == ref for r, ref in zip(read, references))
  return {"eval_cer": edits / max(chars, 1), "eval_exact": exact / max(len(references), 1),
          "eval_read_examples": len(references)}


def build(config, class_names=()) -> Reading:
  v, r, m = config.vision, config.reading, config.model
  shape = (int(v.image_height), int(v.image_width), int(v.channels))
  ph, pw = v.patch_height or v.patch, v.patch
  slots = (shape[0] // ph) * (shape[1] // pw) if ph > 0 and pw > 0 else 0  # the encoder's patches
  return Reading(text_key=config.data.text_key, logits_chunk=m.logits_chunk, z_loss=float(config.optim.z_loss),
                 image_shape=shape, image_slots=slots,
                 difficulty=render.Difficulty(shape[0], shape[1], r.min_font, r.max_font, r.max_offset, r.noise),
                 source=r.source, image_key=r.image_key, caption_template=r.caption_template,
                 class_names=tuple(class_names), label_key=config.data.label_key, min_chars=r.min_chars,
                 eval_examples=r.eval_examples, text_share=float(r.text_share))
