"""A request body read as JSON, and the error every route answers a bad request with:
the parsing each route shares (completions, chat, the tokenizer's routes)."""

import json

MAX_DEPTH = 16  # nesting of the request's JSON; OpenAI's requests need 4


class RequestError(Exception):
  """A bad request: answered with `status` and a JSON error, never a crash."""

  def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.param, self.headers = status, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
  """An error in OpenAI's form, as every refusal and failure is answered."""
  kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
      status, "invalid_request_error" if status < 500 else "server_error")
  return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def read_json(body: bytes) -> dict:
  """The body as a JSON object, with its nulls dropped (null is a field's default, as in
  OpenAI's API: clients send unset options as null). Raises RequestError."""
  try:
    req = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(400, f"the request body is not valid JSON ({e}).") from None
  except RecursionError:
    raise RequestError(400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels).") from None
  except ValueError:  # Python refuses integers of over 4300 digits (a denial-of-service guard)
    raise RequestError(400, "the request body holds a number too long to read (over 4300 digits).") from None
  if not isinstance(req, dict):
    raise RequestError(400, "the request body must be a JSON object.")
  if depth(req) > MAX_DEPTH:  # what reads it (error messages, the chat renderer) may recurse
    raise RequestError(400, f"the request body is nested too deeply (at most {MAX_DEPTH} levels).")
  return {name: value for name, value in req.items() if value is not None}


def depth(value) -> int:
  """How deeply a parsed JSON value nests (without recursion: it is what is being bounded)."""
  deepest, todo = 0, [(value, 1)]
  while todo:
    value, level = todo.pop()
    if isinstance(value, (dict, list)):
      deepest = max(deepest, level)
      if level <= MAX_DEPTH:  # deeper is refused whatever lies below
        todo.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
  return deepest


def shown(value) -> str:
  """A value as an error message quotes it: JSON, cut short."""
  text = json.dumps(value)
  return text if len(text) <= 80 else text[:77] + "..."


def check_text(text: str, what: str, param: str) -> None:
  """RequestError if `text` cannot be encoded (a lone surrogate, which JSON can carry)."""
  try:
    text.encode("utf-8")  # what the tokenizer does first
  except UnicodeEncodeError as e:
    raise RequestError(400, f"{what} is not valid Unicode: it holds a lone surrogate ({text[e.start]!a}) at character"
                            f" {e.start}; send text, or escape pairs that form one character.", param) from None


def token_ids(value, vocab: int, what: str, param: str, empty: bool = False) -> list[int]:
  """`value` as a list of token ids (non-empty unless `empty`), each in [0, vocab); else RequestError."""
  if not isinstance(value, list) or not (value or empty):
    kind = "a list" if empty else "a non-empty list"
    raise RequestError(400, f"{what} must be {kind} of token ids; got {shown(value)}.", param)
  for j, t in enumerate(value):
    if type(t) is not int or not 0 <= t < vocab:  # type(), not isinstance: True is not a token
      raise RequestError(400, f"{what} holds {shown(t)} at position {j}: a token id is an integer in [0, {vocab})"
                              " (the vocabulary).", param)
  return value
