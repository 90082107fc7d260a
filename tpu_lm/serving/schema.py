"""The API's request and response bodies as pydantic models: what /openapi.json (and
the page at /docs) publishes, and what a request is validated against.

Validation is strict (true is not 1, "4" is not 4, 4.0 is not an integer), null is a
field's default (as in OpenAI's API), and fields this server does not know are
ignored. The bounds that depend on the server (max_tokens up to --max_new_tokens, n
up to --max_batch, top_k up to the vocabulary) are checked after the model's, in
requests.py, with the same sentence: `allowed` says what a field takes.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation, ValidationError

from tpu_lm.inference.slots import TOP_LOGPROBS

MAX_STOP = 4  # stop sequences per request, as OpenAI allows

# Checked by requests.py with messages of their own (token ids, prompt lengths, chat roles).
Prompt = Annotated[str | list[str] | list[int] | list[list[int]], SkipValidation]


class Message(BaseModel):
  role: Literal["system", "user", "assistant"]
  # Text, or (a model that reads images) OpenAI's content parts: text and one inline image.
  content: str | list[dict]


class _Sampling(BaseModel):
  """The options completions and chat completions share."""

  model_config = ConfigDict(strict=True, extra="allow")

  model: Annotated[str | None, SkipValidation] = Field(None, description="Ignored: a server serves one model.")
  max_tokens: int | None = Field(None, ge=0, description="Tokens to generate, at most the server's --max_new_tokens"
                                 " (default 16).")
  temperature: float = Field(1.0, ge=0, le=100, description="0 is greedy.")
  top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest set of tokens with this mass.")
  top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0: all).")
  n: int = Field(1, ge=1, description="Choices per prompt; prompts x n at most the server's --max_batch.")
  seed: int | None = Field(None, ge=0, lt=2**32, description="Choice j draws with seed + j (default: random).")
  stream: bool = Field(False, description="Send the text as server-sent events as it is drawn.")
  stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} non-empty strings; a choice ends"
                                       " before the first of them in its text.")
  user: Annotated[Any, SkipValidation] = Field(None, description="Ignored.")


class CompletionRequest(_Sampling):
  """POST /v1/completions."""

  model_config = ConfigDict(json_schema_extra={"required": ["prompt"]})

  prompt: Prompt = Field(None, description="A string, a list of strings, a list of token ids, or a list of lists"
                         " of token ids (taken as sent: no BOS added).")
  suffix: str | None = Field(None, description="Fill in the middle (a run trained with task.kind='fim'): the text"
                             " after the gap; the prompt is the text before it.")
  echo: bool = Field(False, description="Repeat the prompt before each choice's text (with logprobs and max_tokens"
                     " 0: score the prompt).")
  logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS, description="Report each token's log-probability and"
                               " this many alternatives.")


class ChatCompletionRequest(_Sampling):
  """POST /v1/chat/completions, for an instruction-tuned run (its chat template)."""

  model_config = ConfigDict(json_schema_extra={"required": ["messages"]})

  messages: Annotated[list[Message], SkipValidation] = Field(None, description="The conversation so far.")
  max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens.")
  logprobs: bool | None = Field(None, description="Report each token's log-probability.")
  top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS, description="Alternatives per token, with"
                                   " logprobs.")


def allowed(limits, vocab: int, *, chat: bool = False, echo: bool = False) -> dict[str, str]:
  """What each field takes, as error messages say it ("'n' must be {allowed}; got ...")."""
  least = 0 if echo else 1  # with echo, 0 new tokens scores the prompt
  return {
      "max_tokens": f"an integer from {least} to {limits.max_new_tokens}",
      "max_completion_tokens": f"an integer from 1 to {limits.max_new_tokens}",
      "temperature": "a number from 0 to 100", "top_p": "a number in (0, 1]",
      "top_k": f"an integer from 0 to {vocab} (the vocabulary)", "n": f"an integer from 1 to {limits.max_batch}",
      "seed": "an integer in [0, 2**32)", "stream": "true or false", "echo": "true or false",
      "stop": f"a non-empty string or a list of at most {MAX_STOP} of them",
      "logprobs": "true or false" if chat else f"an integer from 0 to {TOP_LOGPROBS}",
      "top_logprobs": f"an integer from 0 to {TOP_LOGPROBS}", "suffix": "a string (the text after the gap)",
  }


def first_field(error: ValidationError) -> str:
  """The request field a validation error is about."""
  return str(error.errors()[0]["loc"][0])


# Responses: built as dictionaries on the hot path; these models document them (and a
# test validates real responses against them).


class Usage(BaseModel):
  prompt_tokens: int
  completion_tokens: int = Field(description="Drawn tokens, end-of-sequence included.")
  total_tokens: int
  speculative: dict[str, int] | None = Field(None, description="With a draft model: draft_tokens, accepted,"
                                             " proposed.")


class CompletionLogprobs(BaseModel):
  tokens: list[str]
  token_logprobs: list[float | None]
  top_logprobs: list[dict[str, float] | None]
  text_offset: list[int]


class CompletionChoice(BaseModel):
  index: int
  text: str
  finish_reason: Literal["stop", "length"] | None
  logprobs: CompletionLogprobs | None


class Completion(BaseModel):
  """A completion, or (stream: true) each event's chunk, with usage only in the whole."""

  id: str
  object: Literal["text_completion"]
  created: int
  model: str
  choices: list[CompletionChoice]
  usage: Usage | None = None


class TopLogprob(BaseModel):
  token: str
  logprob: float
  bytes: list[int]


class TokenLogprob(TopLogprob):
  top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
  content: list[TokenLogprob]


class ChatMessage(BaseModel):
  role: Literal["assistant"]
  content: str


class ChatChoice(BaseModel):
  index: int
  message: ChatMessage
  finish_reason: Literal["stop", "length"] | None
  logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
  id: str
  object: Literal["chat.completion"]
  created: int
  model: str
  choices: list[ChatChoice]
  usage: Usage


class ErrorDetail(BaseModel):
  message: str = Field(description="One sentence: what was wrong, and how to fix it.")
  type: str
  param: str | None = None
  code: int


class ErrorResponse(BaseModel):
  """Every refusal (4xx) and failure (5xx), in OpenAI's form."""

  error: ErrorDetail


class ModelCard(BaseModel):
  id: str
  object: Literal["model"]
  created: int
  owned_by: str


class ModelList(BaseModel):
  object: Literal["list"]
  data: list[ModelCard]


class Health(BaseModel):
  status: Literal["ok"]
  model: str
  step: int
  queued: int = Field(description="Sequences waiting for a slot.")
  running: int = Field(description="Sequences being decoded.")


class TokenizeRequest(BaseModel):
  prompt: str
  add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
  tokens: list[int]
  count: int
  max_model_len: int


class DetokenizeRequest(BaseModel):
  tokens: list[int]


class DetokenizeResponse(BaseModel):
  prompt: str


class EmbeddingRequest(BaseModel):
  """POST /v1/embeddings."""

  input: Prompt = Field(description="A string, a list of strings, a list of token ids, or a list of lists of token"
                        " ids (taken as sent: no BOS added); at most the server's --max_batch inputs.")
  model: Annotated[str | None, SkipValidation] = Field(None, description="Ignored: a server serves one model.")
  encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes.")
  user: Annotated[Any, SkipValidation] = Field(None, description="Ignored.")


class Embedding(BaseModel):
  object: Literal["embedding"]
  index: int
  embedding: list[float] | str


class EmbeddingUsage(BaseModel):
  prompt_tokens: int
  total_tokens: int


class EmbeddingList(BaseModel):
  object: Literal["list"]
  model: str
  data: list[Embedding]
  usage: EmbeddingUsage
