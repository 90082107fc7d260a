"""POST /v1/embeddings, in OpenAI's form: {"input": a string, a list of strings, a list
of token ids or a list of lists of them, "encoding_format": "float" (default) or
"base64"} -> {"object": "list", "data": [{"object": "embedding", "index", "embedding"}],
"model", "usage"}. A text input is read as a completion's prompt is (after the run's
BOS; an encoder's between BOS and EOS, as it read documents); token ids as sent. Each
vector has unit length (inference/embed.py)."""

import base64

import numpy as np

from tpu_lm.serving.body import RequestError, check_text, read_json, shown, token_ids


def parse(body: bytes, run, max_inputs: int) -> tuple[list[list[int]], str]:
  """(the inputs as id lists, the encoding format). Raises RequestError."""
  req = read_json(body)
  if "dimensions" in req:
    raise RequestError(400, "'dimensions' is not supported by this server: its vectors have the model's width;"
                            " remove it.", "dimensions")
  fmt = req.get("encoding_format", "float")
  if fmt not in ("float", "base64"):
    raise RequestError(400, f"'encoding_format' must be \"float\" or \"base64\"; got {shown(fmt)}.", "encoding_format")
  value = req.get("input")
  vocab, context = run.vocab_size, run.max_len
  if isinstance(value, str) or (isinstance(value, list) and value and all(type(v) is int for v in value)):
    value = [value]
  if not isinstance(value, list) or not value:
    raise RequestError(400, "'input' is required: a string, a list of strings, a list of token ids or a list of"
                            f" lists of token ids; got {shown(value)}.", "input")
  if len(value) > max_inputs:
    raise RequestError(400, f"'input' holds {len(value)} inputs, more than this server's {max_inputs} (--max_batch):"
                            " send fewer per request.", "input")
  ids = []
  for i, one in enumerate(value):
    if isinstance(one, str):
      check_text(one, f"input {i}", "input")
      ids.append([int(t) for t in run.encode_prompt(one)])
    else:
      ids.append(token_ids(one, vocab, f"input {i}", "input"))
    if len(ids[-1]) > context:
      raise RequestError(400, f"input {i} is {len(ids[-1])} tokens, more than the model's context of {context}:"
                              " shorten it.", "input")
  return ids, fmt


def answer(vectors: np.ndarray, ids: list[list[int]], fmt: str, model_name: str) -> dict:
  def encoded(v):
    return base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii") if fmt == "base64" else v.tolist()

  tokens = sum(len(i) for i in ids)
  return {"object": "list", "model": model_name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
          "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]}
