"""The HTTP transport of the server: OpenAI-style /v1/completions (stop sequences,
echo, logprobs), /v1/chat/completions (through an instruction-tuned run's chat
template, chat.py) and /v1/models over the engine.

Requests are parsed and checked here (a malformed one gets a 4xx with a JSON
error naming what was wrong); the engine (engine.py) decodes.
"""

import dataclasses
import json
import os
import queue
import secrets
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tpu_lm.data.tokenizer import TextStream
from tpu_lm.errors import UserError
from tpu_lm.inference import chat as chat_lib
from tpu_lm.inference.engine import Busy, Closed, Engine, Job
from tpu_lm.inference.sampling import Sampling
from tpu_lm.inference.slots import TOP_LOGPROBS
from tpu_lm.inference.stops import StopScanner


class RequestError(Exception):
  """A bad request: answered with `status` and a JSON error, never a crash."""

  def __init__(self, status: int, message: str, param: str | None = None):
    super().__init__(message)
    self.status, self.param = status, param


@dataclasses.dataclass
class Limits:
  max_prompt_tokens: int
  max_new_tokens: int
  max_body_bytes: int
  timeout_s: float
  max_batch: int
  read_timeout_s: float = 30.0  # a connection that sends nothing for this long is closed


@dataclasses.dataclass(frozen=True)
class Request:
  prompts: list[str]
  ids: list[list[int]]  # each prompt's token ids, BOS first
  samplings: list[Sampling]  # one per choice of each prompt (n)
  stream: bool
  stop: tuple[str, ...] = ()  # a choice ends before the first of these in its text
  echo: bool = False  # the prompt is repeated at the start of each choice's text
  logprobs: int | None = None  # None: off; else the alternatives reported per token (0-5)
  chat: bool = False  # /v1/chat/completions: answered as chat messages


MAX_STOP = 4  # stop sequences per request, as OpenAI allows
_NEUTRAL = (None, False, "", [], {})  # what clients send for an option they do not use


def parse_request(body: bytes, run, limits: Limits, *, chat: bool = False) -> Request:
  """JSON body of /v1/completions (or, `chat`, /v1/chat/completions) -> Request.
  Raises RequestError."""
  try:
    req = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(400, f"the request body is not valid JSON ({e}).") from None
  if not isinstance(req, dict):
    raise RequestError(400, "the request body must be a JSON object.")
  unsupported = ("suffix", "best_of", "logit_bias") if not chat else (
      "tools", "functions", "tool_choice", "function_call", "response_format", "logit_bias", "audio", "modalities")
  for name in unsupported:
    value = req.get(name)
    if value in _NEUTRAL or (name == "best_of" and value == 1) or (name == "response_format" and value == {"type": "text"}):
      continue
    raise RequestError(400, f"'{name}' is not supported by this server: remove it.", name)

  def field(name, kinds, default, ok, allowed):
    value = req.get(name, default)
    if type(value) not in kinds or not ok(value):  # type(), not isinstance: True is not an int here
      raise RequestError(400, f"'{name}' must be {allowed}; got {json.dumps(value)}.", name)
    return value

  if chat:
    template = chat_lib.template_for(run.config)
    if template is None:
      # Guessing a template would feed the model text it never saw.
      raise RequestError(400, f"this run has no chat template (it was not instruction-tuned: data.dataset="
                              f"{run.config.data.dataset!r}), so chat completions are not served: instruction-tune"
                              " it (configs/finetune.py with --config.data.dataset=instructions) or send the text"
                              " to POST /v1/completions.")
    problem = chat_lib.check_messages(req.get("messages"))
    if problem:
      raise RequestError(400, problem, "messages")
    prompts = [chat_lib.render(template, req["messages"])]
    if "max_completion_tokens" in req:
      req.setdefault("max_tokens", req["max_completion_tokens"])
  else:
    prompt = req.get("prompt")
    if isinstance(prompt, str):
      prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
      prompts = prompt
    else:
      raise RequestError(400, "'prompt' is required: a string or a non-empty list of strings.", "prompt")
  max_tokens = field("max_tokens", (int,), 16, lambda v: 1 <= v <= limits.max_new_tokens,
                     f"an integer from 1 to {limits.max_new_tokens}")
  temperature = field("temperature", (int, float), 1.0, lambda v: 0 <= v <= 100, "a number from 0 to 100")
  top_p = field("top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
  top_k = field("top_k", (int,), 0, lambda v: v >= 0, "an integer >= 0")
  n = field("n", (int,), 1, lambda v: 1 <= v <= limits.max_batch, f"an integer from 1 to {limits.max_batch}")
  seed = field("seed", (int,), secrets.randbits(31), lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
  stream = field("stream", (bool,), False, lambda v: True, "true or false")
  echo = field("echo", (bool,), False, lambda v: True, "true or false") if not chat else False
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
    if logprobs is not None and echo:
      raise RequestError(400, "'logprobs' with 'echo' (the prompt's own log-probabilities) is not supported: drop"
                              " one of them.", "logprobs")
  stop = req.get("stop")
  stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
  if (not isinstance(stop, list) or len(stop) > MAX_STOP
      or not all(isinstance(x, str) and x for x in stop)):
    raise RequestError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them;"
                            f" got {json.dumps(req.get('stop'))}.", "stop")
  if len(prompts) * n > limits.max_batch:
    raise RequestError(400, f"{len(prompts)} prompts x n={n} is more than the {limits.max_batch} sequences"
                            " this server decodes at once: send fewer.", "n")

  ids = [run.encode_prompt(p) for p in prompts]
  for i, p in enumerate(ids):
    if len(p) - 1 > limits.max_prompt_tokens:
      what = "the conversation" if chat else f"prompt {i}"
      raise RequestError(400, f"{what} has {len(p) - 1} tokens; this server accepts at most"
                              f" {limits.max_prompt_tokens}: shorten it.", "messages" if chat else "prompt")
  samplings = [Sampling(max_tokens, float(temperature), top_k, float(top_p), (seed + j) % 2**32)
               for j in range(n)]
  try:
    for p in ids:
      run.decoder.check(len(p), samplings[0])
  except UserError as e:
    raise RequestError(400, str(e), "max_tokens") from None
  return Request(prompts, ids, samplings, stream, tuple(stop), echo, logprobs, chat)


class _ChoiceText:
  """One choice's text as its tokens arrive: detokenized, held back where it could
  begin a stop sequence, ended at one; with the tokens' log-probabilities."""

  def __init__(self, tokenizer, stop: tuple[str, ...], prefix: str):
    self._tok, self._text, self._stops = tokenizer, TextStream(tokenizer), StopScanner(stop)
    self.pending = prefix  # the echoed prompt, sent with the first piece
    self.text = ""  # released so far
    self.logprobs = []  # (token, (logprob, [(id, logprob), ...])) of tokens not yet reported

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
            "top_logprobs": [{word(a): alp for a, alp in top[:k]} for _, (_, top) in entries],
            "text_offset": offsets}


class BoundedServer(ThreadingHTTPServer):
  """A thread per connection, at most `max_connections` at once: one more is answered
  503 with Retry-After on the spot (no thread, no read) and closed."""

  daemon_threads = True

  def __init__(self, address, handler, max_connections: int):
    self._slots = threading.BoundedSemaphore(max_connections)
    self.max_connections = max_connections
    self.busy = InFlight()  # requests being answered (not idle kept-alive connections)
    super().__init__(address, handler)

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      body = json.dumps({"error": {"message": f"the server has {self.max_connections} connections open, its"
                                              " limit: retry in a second.", "type": "server_error", "param": None,
                                   "code": 503}}).encode()
      try:
        request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\n\r\n" + body)
      except OSError:
        pass
      self.shutdown_request(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()


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


def make_handler(run, engine: Engine, limits: Limits):
  model_name = f"tpu_lm/{os.path.basename(run.workdir)}@{run.step}"
  created = int(time.time())

  class Handler(BaseHTTPRequestHandler):
    server_version = "tpu_lm"
    # The socket timeout of each connection (StreamRequestHandler applies it): a client
    # that sends half a request, idles on a kept-alive connection or stops reading a
    # stream holds its thread at most this long.
    timeout = limits.read_timeout_s

    def log_message(self, fmt, *args):  # one line per request on stderr
      sys.stderr.write(f"[serve] {self.address_string()} {fmt % args}\n")

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
      self.wfile.write(body)

    def _error(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
      kind = "invalid_request_error" if status < 500 else "server_error"
      self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}}, headers)

    def do_GET(self):
      path = self.path.split("?")[0]
      if path == "/health":
        self._json(200, {"status": "ok", "model": model_name, "step": run.step, "queued": engine.queued(),
                         "running": engine.running()})
      elif path == "/v1/models":
        self._json(200, {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "tpu_lm"}]})
      else:
        self._error(404, f"no route GET {self.path}: use POST /v1/completions, GET /v1/models or GET /health.")

    def do_POST(self):
      path = self.path.split("?")[0]
      if path not in ("/v1/completions", "/v1/chat/completions"):
        self._error(404, f"no route POST {self.path}: use POST /v1/completions or /v1/chat/completions.")
        return
      try:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
          raise RequestError(411, "a Content-Length header is required.")
        if int(length) > limits.max_body_bytes:
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
        request = parse_request(body, run, limits, chat=path == "/v1/chat/completions")
      except RequestError as e:
        self._error(e.status, str(e), e.param)
        return
      with self.server.busy:
        self._complete(request)

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
      jobs = [Job(i * len(samplings) + j, p, s, events, cancelled, head["id"], request.logprobs is not None)
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
                                    request.prompts[j.index // len(samplings)] if request.echo else "") for j in jobs}
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

      try:
        while len(results) < len(jobs):
          try:
            event = events.get(timeout=max(0.0, deadline - time.time()))
          except queue.Empty:
            cancelled.set()
            self._fail(started, 504, f"the request did not finish within {limits.timeout_s:g} s: ask for fewer"
                                     " tokens or retry.", "timeout")
            return
          kind, index, payload = event[:3]
          if kind == "error":
            cancelled.set()
            status, message = payload
            self._fail(started, status, message, "server_error")
            return
          if kind == "token":
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
        if stream:
          self.wfile.write(b"data: [DONE]\n\n")
          self.wfile.flush()
          return
        prompt_tokens = sum(len(p) - 1 for p in request.ids) * len(samplings)
        completion_tokens = sum(len(c.tokens) for c in results.values())
        self._json(200, {
            **head,
            "choices": [_choice(request, i, texts[i].text, "stop" if texts[i].stopped else results[i].finish_reason,
                                texts[i].take_logprobs(request, 0), final=True)
                        for i in sorted(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })
      except (BrokenPipeError, ConnectionResetError, TimeoutError):
        # The client left or stopped reading for read_timeout_s: its rows are dropped.
        cancelled.set()
        self.close_connection = True

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
