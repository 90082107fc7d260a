"""The HTTP transport of the server: OpenAI-style /v1/completions (text or token-id
prompts, stop sequences, echo, logprobs), /v1/chat/completions (through an
instruction-tuned run's chat template: its objective's chat_prompt,
tasks/instructions.py) and /v1/models over the engine; the run's tokenizer in vLLM's
shapes (tokenizer_api.py).

Requests are parsed and checked here: a malformed one, or a field out of range,
gets a 4xx with a JSON error naming what was wrong, never a 5xx or a dropped
connection (tests/test_serve_fuzz.py fuzzes it); the engine (engine.py) decodes.
The transport also holds the connection limits: the API key, deadlines for the
headers and the body, connections per client, and cancelling the sequences of a
client that has gone.
"""

import collections
import dataclasses
import hmac
import io
import json
import math
import os
import queue
import secrets
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tpu_lm.data import tokenizer as tokenizer_lib
from tpu_lm.data.tokenizer import TextStream
from tpu_lm.errors import UserError
from tpu_lm.inference.engine import Busy, Closed, Engine, Job
from tpu_lm.inference.sampling import Sampling
from tpu_lm.inference.slots import TOP_LOGPROBS
from tpu_lm.inference.stops import StopScanner
from tpu_lm.serving import tokenizer_api
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


MAX_STOP = 4  # stop sequences per request, as OpenAI allows
LINGER_S = 1.0  # how long a closing connection reads what its client still sends
POLL_S = 0.1  # how often a request with no token event checks that its client is still there
# Control characters as escapes in log lines (a request line can carry terminal escape codes).
_LOGGABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))}
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

  def field(name, kinds, default, ok, allowed):
    value = req.get(name, default)
    if type(value) not in kinds or not ok(value):  # type(), not isinstance: True is not an int here
      raise RequestError(400, f"'{name}' must be {allowed}; got {_shown(value)}.", name)
    return value

  if chat:
    if not run.objective.chat:
      # Guessing a template would feed the model text it never saw.
      raise RequestError(400, f"this run has no chat template (it was not instruction-tuned: data.dataset="
                              f"{run.config.data.dataset!r}), so chat completions are not served: instruction-tune"
                              " it (configs/finetune.py with --config.data.dataset=instructions) or send the text"
                              " to POST /v1/completions.")
    problem = instructions.check_messages(req.get("messages"))
    if problem:
      raise RequestError(400, problem, "messages")
    prompts, given = [run.objective.chat_prompt(req["messages"])], None
    if "max_completion_tokens" in req:  # the newer name of max_tokens
      req.setdefault("max_tokens", field("max_completion_tokens", (int,), 16, lambda v: 1 <= v <= limits.max_new_tokens,
                                         f"an integer from 1 to {limits.max_new_tokens}"))
  else:
    prompts, given = _prompts(req.get("prompt"), run.tokenizer.vocab_size)
  echo = field("echo", (bool,), False, lambda v: True, "true or false") if not chat else False
  # With echo, 0 new tokens is prompt scoring: the prompt's own log-probabilities, nothing generated.
  least = 0 if echo else 1
  max_tokens = field("max_tokens", (int,), min(16, limits.max_new_tokens),
                     lambda v: least <= v <= limits.max_new_tokens, f"an integer from {least} to {limits.max_new_tokens}")
  temperature = field("temperature", (int, float), 1.0, lambda v: 0 <= v <= 100, "a number from 0 to 100")
  top_p = field("top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
  vocab = run.decoder.vocab_size
  top_k = field("top_k", (int,), 0, lambda v: 0 <= v <= vocab, f"an integer from 0 to {vocab} (the vocabulary)")
  n = field("n", (int,), 1, lambda v: 1 <= v <= limits.max_batch, f"an integer from 1 to {limits.max_batch}")
  seed = field("seed", (int,), secrets.randbits(31), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
  stream = field("stream", (bool,), False, lambda v: True, "true or false")
  if chat:  # logprobs: true, top_logprobs: alternatives
    wanted = field("logprobs", (bool, type(None)), None, lambda v: True, "true or false")
    top = field("top_logprobs", (int, type(None)), None, lambda v: v is None or 0 <= v <= TOP_LOGPROBS,
                f"an integer from 0 to {TOP_LOGPROBS}")
    if top is not None and not wanted:
      raise RequestError(400, "'top_logprobs' needs \"logprobs\": true.", "top_logprobs")
    logprobs = (top or 0) if wanted else None
  else:
    logprobs = field("logprobs", (int, type(None)), None, lambda v: v is None or 0 <= v <= TOP_LOGPROBS,
                     f"an integer from 0 to {TOP_LOGPROBS}")
  stop = req.get("stop")
  stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
  if (not isinstance(stop, list) or len(stop) > MAX_STOP
      or not all(isinstance(x, str) and x for x in stop)):
    raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them;"
                            f" got {_shown(req.get('stop'))}.", "stop")
  if len(given or prompts) * n > limits.max_batch:
    raise RequestError(400, f"{len(given or prompts)} prompts x n={n} is more than the {limits.max_batch} sequences"
                            " this server decodes at once: send fewer.", "n")

  what = (lambda i: "the conversation") if chat else (lambda i: f"prompt {i}")  # noqa: E731
  suffix, end_id = None if chat else _suffix(req, run, echo, given), None
  if suffix is not None:  # the prompt is the text before the gap
    for i, p in enumerate(prompts):
      check_text(p, what(i), "prompt")
    ids = [run.objective.infill_prompt(run.tokenizer, p, suffix) for p in prompts]
    lead, end_id = [1] * len(ids), run.objective.end_id(run.tokenizer)  # the BOS the server added
  elif given is None:
    for i, p in enumerate(prompts):
      check_text(p, what(i), "messages" if chat else "prompt")
    ids, lead = zip(*(_encode(run, p) for p in prompts))
  else:  # taken as sent, as OpenAI and vLLM take them: no BOS added
    ids, lead = given, [0] * len(given)
    prompts = [run.tokenizer.decode(p) for p in given]
  for i, (p, k) in enumerate(zip(ids, lead)):
    if len(p) - k > limits.max_prompt_tokens:
      raise RequestError(400, f"{what(i)} has {len(p) - k} tokens; this server accepts at most"
                              f" {limits.max_prompt_tokens}: shorten it.", "messages" if chat else "prompt")
  samplings = [Sampling(max_tokens, float(temperature), top_k, float(top_p), (seed + j) % 2**32)
               for j in range(n)]
  for i, p in enumerate(ids):
    try:
      run.decoder.check(len(p), samplings[0] if max_tokens else dataclasses.replace(samplings[0], max_new_tokens=1))
    except UserError as e:
      raise RequestError(400, str(e) if chat or len(ids) == 1 else f"{what(i)}: {e}", "max_tokens") from None
  return Request(prompts, list(ids), list(lead), samplings, stream, tuple(stop), echo, logprobs, chat, end_id)


def _suffix(req: dict, run, echo: bool, given) -> str | None:
  """A completions request's 'suffix' (fill in the middle: the prompt is the text
  before the gap, the suffix the text after), or None. Raises RequestError."""
  suffix = req.get("suffix")
  if suffix is None:
    return None
  if not isinstance(suffix, str):
    raise RequestError(400, f"'suffix' must be a string (the text after the gap); got {_shown(suffix)}.", "suffix")
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


class _ChoiceText:
  """One choice's text as its tokens arrive: detokenized, held back where it could
  begin a stop sequence, ended at one; with the tokens' log-probabilities."""

  def __init__(self, tokenizer, stop: tuple[str, ...], prefix: str, prefix_logprobs=()):
    self._tok, self._text, self._stops = tokenizer, TextStream(tokenizer), StopScanner(stop)
    self.pending = prefix  # the echoed prompt, sent with the first piece
    self.text = ""  # released so far
    # (token, (logprob, [(id, logprob), ...])) of tokens not yet reported; an echoed
    # prompt's first (logprob None: it has no context).
    self.logprobs = list(prefix_logprobs)

  @property
  def stopped(self) -> bool:
    return self._stops.stopped

  def push(self, token: int, logprobs) -> str:
    if not self.stopped and logprobs is not None:
      self.logprobs.append((token, logprobs))
    return self._release(self._stops.push(self._text.push(token)))

  def finish(self) -> str:
    return self._release(self._stops.push(self._text.finish()) + self._stops.finish())

  def _release(self, piece: str) -> str:
    piece, self.pending = self.pending + piece, ""
    self.text += piece
    return piece

  def take_logprobs(self, request: Request, offset: int) -> dict | None:
    """The logprobs object of the tokens gathered since the last call (OpenAI's shapes)."""
    if request.logprobs is None:
      return None
    entries, self.logprobs = self.logprobs, []
    k = request.logprobs
    word = lambda t: self._tok.decode([t])  # noqa: E731
    if request.chat:
      return {"content": [{"token": word(t), "logprob": lp, "bytes": list(word(t).encode()),
                           "top_logprobs": [{"token": word(a), "logprob": alp, "bytes": list(word(a).encode())}
                                            for a, alp in top[:k]]} for t, (lp, top) in entries]}
    offsets = []
    for t, _ in entries:
      offsets.append(offset)
      offset += len(word(t))
    return {"tokens": [word(t) for t, _ in entries], "token_logprobs": [lp for _, (lp, _) in entries],
            "top_logprobs": [None if top is None else {word(a): alp for a, alp in top[:k]} for _, (_, top) in entries],
            "text_offset": offsets}


def prompt_logprobs(run, request: Request, greedy_next: bool = False) -> list[tuple[list, tuple | None]]:
  """Per prompt, its echoed tokens' logprob entries as _ChoiceText holds them (the ids
  the server added before a text prompt are context, not echoed; a token-id prompt's
  first id has no context: None), and with `greedy_next` the entry of the likeliest
  next token: one pass of the one scoring function (inference/score.py) over the
  prompt and one more position."""
  rows = [[*ids, run.tokenizer.eos_id] if greedy_next else ids for ids in request.ids]  # any id: its position's
  scored = iter(run.score([r for r in rows if len(r) > 1], top=TOP_LOGPROBS))  # alternatives are the next token's
  out = []
  for row, lead in zip(rows, request.lead):
    s = next(scored) if len(row) > 1 else None  # a text prompt "" is its BOS alone: nothing to score
    entries = [(row[0], (None, None))] + ([] if s is None else [
        (t, (float(lp), list(zip(map(int, top_i), map(float, top_lp)))))
        for t, lp, top_i, top_lp in zip(row[1:], s.logprobs, s.top_ids, s.top_logprobs)])
    following = None
    if greedy_next:
      top = entries.pop()[1][1]
      following = (top[0][0], (top[0][1], top))
    out.append((entries[lead:], following))
  return out


class BoundedServer(ThreadingHTTPServer):
  """A thread per connection, at most `max_connections` at once and `max_per_client`
  (0: no cap) from one address: one more is answered on the spot (no thread, no read)
  503, or 429 from an address over its share, with Retry-After, and closed. So idle
  connections from one client cannot starve the others."""

  daemon_threads = True

  def __init__(self, address, handler, max_connections: int, max_per_client: int = 8):
    self._slots = threading.BoundedSemaphore(max_connections)
    self.max_connections, self.max_per_client = max_connections, max_per_client
    self._per_client: collections.Counter = collections.Counter()
    self._lock = threading.Lock()
    self.busy = InFlight()  # requests being answered (not idle connections)
    super().__init__(address, handler)

  def process_request(self, request, client_address):
    client, refusal = client_address[0], None
    with self._lock:
      if self.max_per_client and self._per_client[client] >= self.max_per_client:
        refusal = (429, "Too Many Requests", f"your address has {self.max_per_client} connections open, the limit"
                                             " per client: close one, or retry in a second.")
      elif not self._slots.acquire(blocking=False):
        refusal = (503, "Service Unavailable", f"the server has {self.max_connections} connections open, its limit:"
                                               " retry in a second.")
      else:
        self._per_client[client] += 1
    if refusal:
      self._refuse(request, *refusal)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._release(client)
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._release(client_address[0])

  def shutdown_request(self, request):
    """Closes an answered connection so that the client keeps the answer: the write
    side first, then what the client still sends (a body that was refused unread) is
    read and dropped for at most LINGER_S. Closing with unread bytes would reset the
    connection, which can discard the answer before the client reads it."""
    try:
      request.shutdown(socket.SHUT_WR)
      deadline = time.monotonic() + LINGER_S
      while (left := deadline - time.monotonic()) > 0:
        request.settimeout(left)
        if not request.recv(65536):
          break
    except OSError:
      pass
    self.close_request(request)

  def _release(self, client: str) -> None:
    with self._lock:
      self._per_client[client] -= 1
      if not self._per_client[client]:
        del self._per_client[client]
      self._slots.release()

  def _refuse(self, request, status: int, reason: str, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "server_error" if status >= 500 else "rate_limit_error",
                                 "param": None, "code": status}}).encode()
    try:
      request.sendall(f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                      f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    except OSError:
      pass
    super().shutdown_request(request)  # no lingering here: this is the thread that accepts


class InFlight:
  """A count of requests being answered, as a context manager; `wait_idle` for shutdown."""

  def __init__(self):
    self._cond, self.count = threading.Condition(), 0

  def __enter__(self):
    with self._cond:
      self.count += 1

  def __exit__(self, *_):
    with self._cond:
      self.count -= 1
      self._cond.notify_all()

  def wait_idle(self, timeout_s: float) -> bool:
    with self._cond:
      return self._cond.wait_for(lambda: self.count == 0, timeout_s)


class _DeadlineReader(io.RawIOBase):
  """A connection's reads, each bounded by what is left until one deadline (`start`),
  not by a timeout per read: a client that trickles its headers a byte at a time
  cannot hold its thread past the deadline. Writes keep `write_timeout_s`."""

  def __init__(self, sock: socket.socket, write_timeout_s: float):
    self._sock, self._write_timeout_s = sock, write_timeout_s
    self.deadline, self.received = math.inf, 0

  def start(self, seconds: float) -> None:
    self.deadline, self.received = time.monotonic() + seconds, 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    left = self.deadline - time.monotonic()
    if left <= 0:
      raise TimeoutError("timed out")
    self._sock.settimeout(left)
    try:
      n = self._sock.recv_into(buffer)
    finally:
      self._sock.settimeout(self._write_timeout_s)
    self.received += n
    return n


def client_gone(sock: socket.socket) -> bool:
  """Whether the client closed its end of `sock`: readable with nothing to read. (Data,
  e.g. a pipelined next request, is not a close.) Never blocks."""
  poller = select.poll()
  poller.register(sock, select.POLLIN)
  if not poller.poll(0):
    return False
  try:
    return sock.recv(1, socket.MSG_PEEK) == b""
  except (BlockingIOError, InterruptedError):
    return False
  except OSError:  # reset by the peer
    return True


def _speculative_usage(completions) -> dict | None:
  """A request's draft tokens accepted and proposed, over its choices (served with a draft model)."""
  counts = [c.speculative for c in completions if c.speculative]
  if not counts:
    return None
  return {"draft_tokens": counts[0]["draft_tokens"], "accepted": sum(c["accepted"] for c in counts),
          "proposed": sum(c["proposed"] for c in counts)}


def make_handler(run, engine: Engine, limits: Limits, api_key: str | None = None):
  """The request handler class; with `api_key`, every route but GET /health needs the
  header `Authorization: Bearer <api_key>`."""
  model_name = f"tpu_lm/{os.path.basename(run.workdir)}@{run.step}"
  created = int(time.time())
  key = api_key.encode() if api_key else None

  class Handler(BaseHTTPRequestHandler):
    server_version = "tpu_lm"
    default_request_version = "HTTP/1.0"  # a two-word request line still gets a status line and headers
    # The socket timeout of each connection (StreamRequestHandler applies it) for writes:
    # a client that stops reading a stream holds its thread at most this long. Reads
    # have deadlines (_DeadlineReader): --header_timeout_s for the request line and
    # headers, --read_timeout_s for the body.
    timeout = limits.read_timeout_s

    def setup(self):
      super().setup()
      self.rfile.close()
      self._reader = _DeadlineReader(self.connection, limits.read_timeout_s)
      self.rfile = io.BufferedReader(self._reader)

    def handle_one_request(self):
      """BaseHTTPRequestHandler's, with the header deadline, JSON errors for every
      malformed request (never a dropped connection) and the API key check."""
      self.command, self.requestline, self.request_version, self._responded = None, "", "HTTP/1.0", False
      self._reader.start(limits.header_timeout_s)
      try:
        self.raw_requestline = self.rfile.readline(65537)
        if self.raw_requestline in (b"\r\n", b"\n"):  # one empty line before a request is allowed (RFC 9112)
          self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
          self.close_connection = True
          return
        if len(self.raw_requestline) > 65536:
          self.send_error(414, "the request line is longer than 65536 bytes.")
          return
        if not self.parse_request():
          return
        self._reader.start(limits.read_timeout_s)  # the body
        method = getattr(self, f"do_{self.command}", None)
        open_route = (self.command, self.path.split("?")[0]) == ("GET", "/health")
        if method is None:
          self.close_connection = True
          self._error(405, f"method {self.command} is not allowed: use GET or POST.")
        elif key is not None and not open_route and not self._authorized():
          self.close_connection = True  # the body is not read: it must not be taken for a next request
          self._error(401, "a valid API key is required: send the header 'Authorization: Bearer <key>' with the key"
                           " the server was started with (--api_key or TPU_LM_API_KEY).",
                      headers={"WWW-Authenticate": "Bearer"})
        else:
          method()
        self.wfile.flush()
      except TimeoutError:
        self.close_connection = True
        if self._reader.received and not self._responded:  # a request began but did not arrive whole
          self._quietly(408, f"the request line and headers did not arrive within {limits.header_timeout_s:g} s.")
      except OSError:  # the client went (reset, broken pipe)
        self.close_connection = True
      except Exception:  # a bug of ours: said so, and logged, never a dropped connection
        self.close_connection = True
        self.log_message("internal error: %s", traceback.format_exc())
        if not self._responded:
          self._quietly(500, "internal server error: the server's log has the details.")

    def _quietly(self, status: int, message: str) -> None:
      try:
        self._error(status, message)
      except OSError:
        pass

    def _authorized(self) -> bool:
      scheme, _, token = str(self.headers.get("Authorization", "")).partition(" ")
      # Header text is read as latin-1: encoding it so gives back the bytes sent.
      return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1", "replace"), key)

    def send_error(self, code, message=None, explain=None):
      """The standard library's refusals (request line, headers) as JSON errors."""
      self.close_connection, code = True, int(code)
      if code == 505:  # an HTTP/2 request line sent as HTTP/1 text: a malformed request
        code, message = 400, f"{message}: send HTTP/1.0 or HTTP/1.1."
      self._error(code, message or HTTPStatus(code).phrase)

    def send_response(self, code, message=None):
      self._responded = True
      super().send_response(code, message)

    def log_message(self, fmt, *args):  # one line per request on stderr, control characters escaped
      sys.stderr.write(f"[serve] {self.address_string()} {(fmt % args).translate(_LOGGABLE)}\n")

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
      body = json.dumps(obj).encode()
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(body)))
      for name, value in (headers or {}).items():
        self.send_header(name, value)
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(body)

    def _error(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
      kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
          status, "invalid_request_error" if status < 500 else "server_error")
      self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}}, headers)

    def do_GET(self):
      path = self.path.split("?")[0]
      if path == "/health":
        self._json(200, {"status": "ok", "model": model_name, "step": run.step, "queued": engine.queued(),
                         "running": engine.running()})
      elif path == "/v1/models":
        self._json(200, {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "tpu_lm"}]})
      elif path == "/tokenizer_info":
        self._json(200, tokenizer_api.info(run))
      else:
        self._error(404, f"no route GET {self.path}: use POST /v1/completions, GET /v1/models, GET /tokenizer_info"
                         " or GET /health.")

    def do_POST(self):
      path = self.path.split("?")[0]
      tokenizer_route = {"/tokenize": tokenizer_api.tokenize, "/detokenize": tokenizer_api.detokenize}.get(path)
      if tokenizer_route:
        try:
          self._json(200, tokenizer_route(self._body(), run))
        except RequestError as e:
          self._error(e.status, str(e), e.param)
        return
      if path not in ("/v1/completions", "/v1/chat/completions"):
        self.close_connection = True  # its body is not read
        self._error(404, f"no route POST {self.path}: use POST /v1/completions, /v1/chat/completions, /tokenize or"
                         " /detokenize.")
        return
      try:
        request = parse_request(self._body(), run, limits, chat=path == "/v1/chat/completions")
      except RequestError as e:
        self._error(e.status, str(e), e.param)
        return
      with self.server.busy:
        self._complete(request)

    def _body(self) -> bytes:
      length = self.headers.get("Content-Length")
      if length is None:
        raise RequestError(411, "a Content-Length header is required.")
      length = str(length).strip()
      if not (length.isascii() and length.isdigit()):  # int() would take "²", "+1" or "1_0"
        self.close_connection = True
        raise RequestError(400, f"the Content-Length header must be a number of bytes; got {_shown(length)}.")
      if len(length) > 15 or int(length) > limits.max_body_bytes:
        self.close_connection = True  # the unread body must not be taken for the next request
        raise RequestError(413, f"the request body is {length} bytes; the limit is {limits.max_body_bytes}.")
      try:
        body = self.rfile.read(int(length))
      except TimeoutError:
        self.close_connection = True
        raise RequestError(408, f"the request body ({length} bytes) did not arrive within"
                                f" {limits.read_timeout_s:g} s: send it whole, or raise --read_timeout_s.") from None
      if len(body) < int(length):
        self.close_connection = True
        raise RequestError(400, f"the connection closed after {len(body)} of the {length} bytes announced.")
      return body

    def do_PUT(self):
      self._error(405, f"method PUT is not allowed on {self.path}: use POST /v1/completions.")

    do_DELETE = do_PATCH = do_PUT

    def _complete(self, request: Request) -> None:
      samplings, stream = request.samplings, request.stream
      events: queue.Queue = queue.Queue()
      cancelled = threading.Event()
      head = {"id": f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
              "object": "chat.completion.chunk" if request.chat and stream else
                        "chat.completion" if request.chat else "text_completion",
              "created": int(time.time()), "model": model_name}
      scoring = request.echo and request.logprobs is not None
      # What evaluation harnesses send to score text (echo, logprobs, max_tokens 0, or 1
      # greedy) is answered from one scoring pass, without the engine.
      greedy_next = scoring and samplings[0].max_new_tokens == 1 and samplings[0].temperature == 0
      prompt_lp = prompt_logprobs(run, request, greedy_next) if scoring else None
      if not samplings[0].max_new_tokens or greedy_next:
        self._scored(request, head, prompt_lp)
        return
      jobs = [Job(i * len(samplings) + j, p, s, events, cancelled, head["id"], request.logprobs is not None,
                  end_id=request.end_id)
              for i, p in enumerate(request.ids) for j, s in enumerate(samplings)]
      try:
        engine.submit(jobs)
      except Busy as e:
        self._error(429, f"the server is busy ({e.queued} sequences waiting): retry after {e.retry_after_s} s.",
                    headers={"Retry-After": str(e.retry_after_s)})
        return
      except Closed:
        self._error(503, "the server is shutting down: retry on another.")
        return
      deadline = time.time() + limits.timeout_s
      texts = {j.index: _ChoiceText(run.tokenizer, request.stop,
                                    request.prompts[j.index // len(samplings)] if request.echo else "",
                                    prompt_lp[j.index // len(samplings)][0] if prompt_lp else ()) for j in jobs}
      by_index = {j.index: j for j in jobs}
      results, started = {}, False

      def send(index: int, piece: str, reason: str | None) -> None:
        nonlocal started
        if not started:
          self._start_stream()
          started = True
        offset = len(texts[index].text) - len(piece)
        self._event({**head, "choices": [_choice(request, index, piece, reason,
                                                 texts[index].take_logprobs(request, offset))]})

      drawn = 0
      try:
        while len(results) < len(jobs):
          try:
            event = events.get(timeout=min(POLL_S, max(0.0, deadline - time.time())))
          except queue.Empty:
            event = None
          # Checked once per burst of events (a step's) and every POLL_S while none come
          # (queued, prefilling): a client gone, streamed or not, frees its slots at the next step.
          if events.empty() and client_gone(self.connection):
            cancelled.set()
            self.close_connection = True
            self.log_message('"%s" cancelled: the client closed the connection (%d tokens drawn)', self.requestline,
                             drawn)
            return
          if event is None:
            if time.time() < deadline:
              continue
            cancelled.set()
            self._fail(started, 504, f"the request did not finish within {limits.timeout_s:g} s: ask for fewer"
                                     " tokens or retry.", "timeout")
            return
          kind, index, payload = event[:3]
          if kind == "error":
            cancelled.set()
            status, message = payload
            self._fail(started, status, message, "invalid_request_error" if status < 500 else "server_error")
            return
          if kind == "token":
            drawn += 1
            if request.chat and payload == run.tokenizer.eos_id:
              continue  # a chat message's logprobs are its tokens', as OpenAI's: not the end-of-sequence
            piece = texts[index].push(payload, event[3])
            if texts[index].stopped:
              by_index[index].halt.set()  # decoding this choice further is wasted: its slot frees
            # With logprobs, every token is an event (its text may be held back, not its logprob).
            if stream and (piece or request.logprobs is not None or (request.chat and not started)):
              send(index, piece, None)
          elif kind == "done":
            results[index] = payload
            piece = texts[index].finish()
            if stream:
              send(index, piece, "stop" if texts[index].stopped else payload.finish_reason)
        speculative = _speculative_usage(results.values())
        if speculative:
          self.log_message('"%s" speculative: %d of %d draft tokens accepted', self.requestline,
                           speculative["accepted"], speculative["proposed"])
        if stream:
          self.wfile.write(b"data: [DONE]\n\n")
          self.wfile.flush()
          return
        prompt_tokens = sum(len(p) - k for p, k in zip(request.ids, request.lead)) * len(samplings)
        # End-of-sequence counts as drawn (as OpenAI and vLLM count it): a "stop" without a stop sequence.
        completion_tokens = sum(len(c.tokens) + (c.finish_reason == "stop" and not texts[i].stopped)
                                for i, c in results.items())
        self._json(200, {
            **head,
            "choices": [_choice(request, i, texts[i].text, "stop" if texts[i].stopped else results[i].finish_reason,
                                texts[i].take_logprobs(request, 0), final=True)
                        for i in sorted(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      **({"speculative": speculative} if speculative else {})},
        })
      except (OSError, TimeoutError):
        # The client left or stopped reading for read_timeout_s: its rows are dropped.
        cancelled.set()
        self.close_connection = True

    def _scored(self, request: Request, head: dict, prompt_lp) -> None:
      """Echo with max_tokens 0: each choice is its prompt (with its log-probabilities,
      if asked), nothing generated; or with max_tokens 1, greedy and logprobs, the
      prompt then its likeliest next token (prompt_logprobs' greedy_next)."""
      n = len(request.samplings)
      choices, completion_tokens = [], 0
      for index in range(len(request.ids) * n):
        entries, following = prompt_lp[index // n] if prompt_lp else ((), None)
        text = _ChoiceText(run.tokenizer, request.stop, request.prompts[index // n], entries)
        reason = "length"
        if following is not None:
          completion_tokens += 1
          token, logprobs = following
          text.push(token, logprobs)
          reason = "stop" if text.stopped or token == run.tokenizer.eos_id else "length"
        text.finish()
        choices.append(_choice(request, index, text.text, reason, text.take_logprobs(request, 0), final=True))
      prompt_tokens = sum(len(p) - k for p, k in zip(request.ids, request.lead)) * n
      if request.stream:
        self._start_stream()
        for choice in choices:
          self._event({**head, "choices": [choice]})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        return
      self._json(200, {**head, "choices": choices, "usage": {
          "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}})

    def _fail(self, started: bool, status: int, message: str, kind: str) -> None:
      """An error before the stream began is the response; after, the stream's last event."""
      if started:
        self._event({"error": {"message": message, "type": kind, "code": status}})
      else:
        self._error(status, message)

    def _start_stream(self) -> None:
      self.send_response(200)
      self.send_header("Content-Type", "text/event-stream")
      self.send_header("Cache-Control", "no-cache")
      self.send_header("Connection", "close")  # the stream ends when the connection does
      self.close_connection = True
      self.end_headers()

    def _event(self, obj: dict) -> None:
      self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
      self.wfile.flush()

  return Handler


def _choice(request: Request, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
            final: bool = False) -> dict:
  """One choice of a response (`final`) or of a streamed chunk, completion or chat."""
  if not request.chat:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
  if final:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": logprobs}
  return {"index": index, "delta": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
          "logprobs": logprobs}
