"""A completions or chat completions request, read and checked: every field's type
and range (the models of schema.py, then the bounds this server sets), the prompts as
token ids. A malformed request, or a field out of range, is a RequestError naming it
(a 4xx), never a crash: tests/test_serve_fuzz.py fuzzes it."""

import dataclasses
import secrets

from pydantic import ValidationError

from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.errors import UserError
from tpu_lm.inference.sampling import Sampling
from tpu_lm.serving import images, schema
from tpu_lm.serving.body import RequestError, check_text, read_json, token_ids
from tpu_lm.serving.body import shown as _shown
from tpu_lm.tasks import instructions


@dataclasses.dataclass
class Limits:
  max_prompt_tokens: int
  max_new_tokens: int
  max_body_bytes: int
  timeout_s: float
  max_batch: int
  read_timeout_s: float = 30.0  # the request body must arrive, and each stream write go out, within this
  header_timeout_s: float = 5.0  # the request line and headers must arrive within this (idle connections close)


@dataclasses.dataclass(frozen=True)
class Request:
  prompts: list[str]  # each prompt's text, as echo repeats it (a token-id prompt's decoded)
  ids: list[list[int]]  # what the model reads: a text prompt's ids after the run's BOS, token ids as sent
  lead: list[int]  # per prompt, how many leading ids the server added (a text prompt's BOS): not echoed or counted
  samplings: list[Sampling]  # one per choice of each prompt (n)
  stream: bool
  stop: tuple[str, ...] = ()  # a choice ends before the first of these in its text
  echo: bool = False  # the prompt is repeated at the start of each choice's text
  logprobs: int | None = None  # None: off; else the alternatives reported per token (0-5)
  chat: bool = False  # /v1/chat/completions: answered as chat messages
  end_id: int | None = None  # a fill-in-the-middle request's end of middle: it ends a choice as end-of-sequence does
  images: list | None = None  # per prompt, the image it is read after (uint8 [H, W, C]) or None (images.py)



_NEUTRAL = (None, False, "", [], {})  # what clients send for an option they do not use


def parse_request(body: bytes, run, limits: Limits, *, chat: bool = False) -> Request:
  """JSON body of /v1/completions (or, `chat`, /v1/chat/completions) -> Request.
  Every field is checked here, its type and range; null is the field's default, as
  in OpenAI's API (clients send unset options as null). Raises RequestError."""
  req = read_json(body)
  unsupported = ("best_of", "logit_bias") if not chat else (
      "tools", "functions", "tool_choice", "function_call", "response_format", "logit_bias", "audio", "modalities")
  for name in unsupported:
    value = req.get(name)
    if value in _NEUTRAL or (name == "best_of" and value == 1) or (name == "response_format" and value == {"type": "text"}):
      continue
    raise RequestError(400, f"'{name}' is not supported by this server: remove it.", name)
  echo = req.get("echo") is True and not chat
  vocab = run.decoder.vocab_size
  allowed = schema.allowed(limits, vocab, chat=chat, echo=echo)

  def refuse(name: str):
    return RequestError(400, f"'{name}' must be {allowed[name]}; got {_shown(req.get(name))}.", name)

  try:
    fields = (schema.ChatCompletionRequest if chat else schema.CompletionRequest).model_validate(req)
  except ValidationError as e:
    raise refuse(schema.first_field(e)) from None
  if chat:
    if not run.objective.chat:
      # Guessing a template would feed the model text it never saw.
      raise RequestError(400, f"this run has no chat template (it was not instruction-tuned: data.dataset="
                              f"{run.config.data.dataset!r}), so chat completions are not served: instruction-tune"
                              " it (configs/finetune.py with --config.data.dataset=instructions) or send the text"
                              " to POST /v1/completions.")
    vision = run.decoder.cfg.vision
    messages, image = images.split_parts(
        req.get("messages"), vision and (vision.image_height, vision.image_width, vision.channels))
    problem = instructions.check_messages(messages)
    if problem:
      raise RequestError(400, problem, "messages")
    prompts, given = [run.objective.chat_prompt(messages)], None
    if fields.max_completion_tokens is not None:  # the newer name of max_tokens
      if fields.max_completion_tokens > limits.max_new_tokens:
        raise refuse("max_completion_tokens")
      if fields.max_tokens is None:
        fields.max_tokens = fields.max_completion_tokens
    if fields.top_logprobs is not None and not fields.logprobs:
      raise RequestError(400, "'top_logprobs' needs \"logprobs\": true.", "top_logprobs")
    logprobs = (fields.top_logprobs or 0) if fields.logprobs else None
  else:
    prompts, given = _prompts(req.get("prompt"), run.tokenizer.vocab_size)
    logprobs = fields.logprobs
  max_tokens = min(16, limits.max_new_tokens) if fields.max_tokens is None else fields.max_tokens
  if not (0 if echo else 1) <= max_tokens <= limits.max_new_tokens:
    raise refuse("max_tokens")
  if fields.top_k > vocab:
    raise refuse("top_k")
  if fields.n > limits.max_batch:
    raise refuse("n")
  n, seed = fields.n, secrets.randbits(31) if fields.seed is None else fields.seed
  stop = [] if fields.stop is None else [fields.stop] if isinstance(fields.stop, str) else fields.stop
  if len(stop) > schema.MAX_STOP or not all(stop):
    raise refuse("stop")
  if len(given or prompts) * n > limits.max_batch:
    raise RequestError(400, f"{len(given or prompts)} prompts x n={n} is more than the {limits.max_batch} sequences"
                            " this server decodes at once: send fewer.", "n")

  what = (lambda i: "the conversation") if chat else (lambda i: f"prompt {i}")  # noqa: E731
  suffix, end_id = None if chat else _suffix(fields.suffix, run, echo, given), None
  if suffix is not None:  # the prompt is the text before the gap
    for i, p in enumerate(prompts):
      check_text(p, what(i), "prompt")
    ids = [run.objective.infill_prompt(run.tokenizer, p, suffix) for p in prompts]
    lead, end_id = [1] * len(ids), run.objective.end_id(run.tokenizer)  # the BOS the server added
  elif given is None:
    for i, p in enumerate(prompts):
      check_text(p, what(i), "messages" if chat else "prompt")
    ids, lead = zip(*(_encode(run, p) for p in prompts))
    if chat and image is not None:  # its positions lead the prompt: context, not prompt tokens
      from tpu_lm.tasks import reading

      slots = run.decoder.cfg.vision.num_patches
      ids, lead = [reading.image_prompt(slots, p) for p in ids], [k + slots for k in lead]
  else:  # taken as sent, as OpenAI and vLLM take them: no BOS added
    ids, lead = given, [0] * len(given)
    prompts = [run.tokenizer.decode(p) for p in given]
  for i, (p, k) in enumerate(zip(ids, lead)):
    if len(p) - k > limits.max_prompt_tokens:
      raise RequestError(400, f"{what(i)} has {len(p) - k} tokens; this server accepts at most"
                              f" {limits.max_prompt_tokens}: shorten it.", "messages" if chat else "prompt")
  samplings = [Sampling(max_tokens, float(fields.temperature), fields.top_k, float(fields.top_p), (seed + j) % 2**32)
               for j in range(n)]
  for i, p in enumerate(ids):
    try:
      run.decoder.check(len(p), samplings[0] if max_tokens else dataclasses.replace(samplings[0], max_new_tokens=1))
    except UserError as e:
      raise RequestError(400, str(e) if chat or len(ids) == 1 else f"{what(i)}: {e}", "max_tokens") from None
  return Request(prompts, list(ids), list(lead), samplings, fields.stream, tuple(stop), echo, logprobs, chat, end_id,
                 [image] if chat and image is not None else None)


def _suffix(suffix: str | None, run, echo: bool, given) -> str | None:
  """A completions request's 'suffix' (fill in the middle: the prompt is the text
  before the gap, the suffix the text after), or None. Raises RequestError."""
  if suffix is None:
    return None
  if not getattr(run.objective, "infills", False):
    raise RequestError(400, f"this run was not trained to fill in the middle (task.kind={run.objective.name!r}), so"
                            " 'suffix' is not served: train one with configs/fim.py (task.kind='fim'), or remove"
                            " 'suffix'.", "suffix")
  if given is not None:
    raise RequestError(400, "'suffix' goes with a text prompt (the text before the gap), not token ids: send text.",
                       "suffix")
  if echo:
    raise RequestError(400, "'echo' with 'suffix' is not supported: the response is the middle alone; remove 'echo'.",
                       "echo")
  check_text(suffix, "the suffix", "suffix")
  return suffix


def _prompts(prompt, vocab: int) -> tuple[list[str] | None, list[list[int]] | None]:
  """The completions 'prompt' as OpenAI's API takes it: text (a string, or a list of
  them) -> (texts, None), or token ids (a list of ints, or a list of such lists) ->
  (None, ids). Raises RequestError."""
  if isinstance(prompt, str):
    return [prompt], None
  if not isinstance(prompt, list):
    raise RequestError(400, "'prompt' is required: a string, a list of strings, a list of token ids or a list of"
                            " lists of token ids.", "prompt")
  if not prompt:
    raise RequestError(400, "'prompt' is an empty list: send at least one prompt.", "prompt")
  texts = [isinstance(p, str) for p in prompt]
  if all(texts):
    return prompt, None
  if any(texts):
    raise RequestError(400, "'prompt' mixes strings and token ids: send one kind in a request.", "prompt")
  if all(isinstance(p, list) for p in prompt):
    return None, [token_ids(p, vocab, f"prompt {i}", "prompt") for i, p in enumerate(prompt)]
  return None, [token_ids(prompt, vocab, "prompt 0", "prompt")]


def _encode(run, text: str) -> tuple[list[int], int]:
  """A text prompt's ids as the model reads it (run.encode_prompt) and how many of them
  lead it that the text does not hold (the run's BOS): those are context, not prompt."""
  ids, own = run.encode_prompt(text), tokenizer_lib.encode_text(run.tokenizer, text)
  added = len(ids) - len(own)
  return ids, added if added >= 0 and ids[added:] == own else 0

