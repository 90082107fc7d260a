"""The run's tokenizer over HTTP, in vLLM's shapes, so that a client can tokenize as
the server does (lm-evaluation-harness's remote tokenizer, `tokenizer_backend=remote`):
GET /tokenizer_info, POST /tokenize, POST /detokenize.

lm-eval takes the end-of-sequence id to be the first id of `/tokenize` of the
`eos_token` string: a special token's string in the text is that token
(tokenizer.encode_text), as with Hugging Face tokenizers.
"""

from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.serving.body import RequestError, check_text, read_json, shown, token_ids
from tpu_lm.tasks import instructions


def info(run) -> dict:
  """GET /tokenizer_info: the special tokens' strings and ids, the context, and, for an
  instruction-tuned run, its chat template as Jinja (what chat completions apply)."""
  tok = run.tokenizer
  names = tokenizer_lib.special_tokens(tok)
  out = {"tokenizer_class": type(tok).__name__, "vocab_size": tok.vocab_size,
         "model_max_length": run.max_len, "max_model_len": run.max_len,
         # How a text prompt becomes ids here: a token-id prompt is read as sent, so it
         # should begin as these do (a run trained here: with bos_token_id).
         "prompt": tok.prompt, "add_bos_token": tok.prompt == tokenizer_lib.PROMPT_BOS}
  for kind in ("bos", "eos", "pad"):
    out[f"{kind}_token"], out[f"{kind}_token_id"] = names[f"{kind}_id"], getattr(tok, f"{kind}_id")
  if run.objective.chat:
    out["chat_template"] = instructions.jinja_template(run.objective.chat_template)
  return out


def tokenize(body: bytes, run) -> dict:
  """POST /tokenize {"prompt": text, "add_special_tokens": bool (default true)} ->
  {"tokens", "count", "max_model_len"}: with special tokens, the ids a text prompt of
  /v1/completions becomes (run.encode_prompt); without, the text's own."""
  req = read_json(body)
  text = req.get("prompt")
  if not isinstance(text, str):
    raise RequestError(400, f"'prompt' is required: the text to tokenize; got {shown(text)}.", "prompt")
  special = req.get("add_special_tokens", True)
  if type(special) is not bool:
    raise RequestError(400, f"'add_special_tokens' must be true or false; got {shown(special)}.",
                       "add_special_tokens")
  check_text(text, "the prompt", "prompt")
  ids = run.encode_prompt(text) if special else tokenizer_lib.encode_text(run.tokenizer, text)
  return {"tokens": [int(t) for t in ids], "count": len(ids), "max_model_len": run.max_len}


def detokenize(body: bytes, run) -> dict:
  """POST /detokenize {"tokens": [ids]} -> {"prompt": text}, special tokens left out (as
  completions' text leaves them)."""
  req = read_json(body)
  ids = token_ids(req.get("tokens"), run.tokenizer.vocab_size, "'tokens'", "tokens", empty=True)
  return {"prompt": run.tokenizer.decode(ids)}
