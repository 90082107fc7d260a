"""Hugging Face tokenizers (`tokenizer.json`, through the `tokenizers` library) as a
tpu_lm tokenizer kind, with the special ids the model was trained with.

A Hugging Face tokenizer directory holds `tokenizer.json` (the whole pipeline:
normalizer, pre-tokenizer, model, decoder) and usually `tokenizer_config.json` /
`special_tokens_map.json` naming the beginning-, end-of-sequence and padding
tokens; a model's `config.json` may name their ids instead. Encoding adds no
special tokens: packing adds [BOS] and [EOS] itself, as for every tokenizer.

A model imported from Hugging Face is prompted as `transformers` prompts it
(`encode_with_special_tokens`): transformers 5 (checked on 5.24, GPT-2, Llama 2 and
Llama 3 layouts) adds exactly what tokenizer.json's post-processor adds, nothing
without one, and ignores tokenizer_config.json's add_bos_token / add_eos_token
whenever a tokenizer.json is there (it always is here).
"""

import hashlib
import json
import os

from tpu_lm import storage
from tpu_lm.data.tokenizer import PROMPT_BOS
from tpu_lm.errors import UserError

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer:
  """`tokenizer.json` plus its special ids; `directory` keeps the files it came from."""

  prompt = PROMPT_BOS
  sentinels: dict[str, int] = {}  # its own special tokens are in its vocabulary

  def __init__(self, directory: str, special_ids: dict | None = None):
    import tokenizers

    path = os.path.join(directory, "tokenizer.json")
    try:
      with storage.open(path, "rb") as f:
        blob = f.read()
      self._tok = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
    except FileNotFoundError:
      raise UserError(
          f"{path} is missing: a Hugging Face tokenizer needs its tokenizer.json (slow-only tokenizers"
          " without one can be converted with transformers' AutoTokenizer(...).save_pretrained)."
      ) from None
    except Exception as e:  # tokenizers raises bare Exception on a bad file
      raise UserError(f"{path} is not a readable Hugging Face tokenizer ({str(e)[:200]}): replace the file.") from None
    self.directory = directory
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    # The tokens its files name, read once. A run directory records the ids it was
    # trained with; a model directory names them in its files.
    named = _named_ids(directory, self._tok, ("bos", "eos", "pad", "cls", "sep", "mask"))
    ids = special_ids or _special_ids(directory, named)
    self.bos_id, self.eos_id = ids["bos_id"], ids["eos_id"]
    # Padding is never a target (weight 0): a tokenizer without a pad token pads with EOS.
    self.pad_id = ids["pad_id"] if ids["pad_id"] is not None else self.eos_id
    # BERT's [MASK], RoBERTa's <mask>: the masked LM's <mask> sentinel is this id (add_sentinels).
    self.mask_id = named.get("mask")
    self.name = f"hf{self.vocab_size}-{hashlib.sha256(blob).hexdigest()[:10]}"

  def encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_special_tokens(self, text: str) -> list[int]:
    """`text` as `transformers.AutoTokenizer` encodes it: tokenizer.json's post-processor applied."""
    return self._tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids):
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def token_text(self, token: int) -> str:
    """The string of one token as the vocabulary writes it (a special token's name)."""
    return self._tok.id_to_token(int(token))

  def files(self) -> dict[str, bytes]:
    """The tokenizer's files by name, to copy into a run or an export."""
    out = {}
    for name in FILES:
      path = os.path.join(self.directory, name)
      if storage.exists(path):
        with storage.open(path, "rb") as f:
          out[name] = f.read()
    return out


def _token_text(value):
  """tokenizer_config.json writes a token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _named_ids(directory: str, tok, kinds) -> dict:
  """{kind: id} of the tokens special_tokens_map.json / tokenizer_config.json name as
  `{kind}_token` (the later file wins) and the vocabulary holds."""
  names = {}
  for file in ("special_tokens_map.json", "tokenizer_config.json"):
    try:
      with storage.open(os.path.join(directory, file)) as f:
        meta = json.load(f)
    except (OSError, ValueError):
      continue
    for kind in kinds:
      text = _token_text(meta.get(f"{kind}_token"))
      if text is not None:
        names[kind] = text
  ids = {kind: tok.token_to_id(text) for kind, text in names.items()}
  return {kind: i for kind, i in ids.items() if i is not None}


def _special_ids(directory: str, named: dict) -> dict:
  """BOS, EOS and padding ids from the tokens the files name (`named`), else config.json's."""
  # BERT's tokenizers name no BOS or EOS: its [CLS] opens a text and [SEP] closes it.
  ids = {f"{k}_id": named.get(k, named.get(alias)) for k, alias in (("bos", "cls"), ("eos", "sep"), ("pad", None))}
  try:  # a model's config.json names ids where the tokenizer files name none
    with storage.open(os.path.join(directory, "config.json")) as f:
      model_config = json.load(f)
  except (OSError, ValueError):
    model_config = {}
  for kind in ("bos", "eos", "pad"):
    if ids[f"{kind}_id"] is None:
      value = model_config.get(f"{kind}_token_id")
      ids[f"{kind}_id"] = value[0] if isinstance(value, list) and value else value
  if ids["eos_id"] is None:
    raise UserError(
        f"the Hugging Face tokenizer in {directory} names no end-of-sequence token: set eos_token in its"
        " tokenizer_config.json (or eos_token_id in config.json)."
    )
  if ids["bos_id"] is None:  # documents still need a start marker; GPT-2 uses its EOS for both
    ids["bos_id"] = ids["eos_id"]
  return ids
