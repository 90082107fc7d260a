"""The HTTP transport of the server: OpenAI-style /v1/completions (with stop sequences
and echo) and /v1/models over the engine.

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
from tpu_lm.inference.engine import Busy, Engine, Job
from tpu_lm.inference.sampling import Sampling
from tpu_lm.inference.stops import StopScanner, first_stop


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


MAX_STOP = 4  # stop sequences per request, as OpenAI allows


def parse_request(body: bytes, run, limits: Limits) -> Request:
  """JSON body -> Request. Raises RequestError."""
  try:
    req = json.loads(body)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RequestError(400, f"the request body is not valid JSON ({e}).") from None
  if not isinstance(req, dict):
    raise RequestError(400, "the request body must be a JSON object.")
  for unsupported in ("suffix", "logprobs", "best_of", "logit_bias"):
    value = req.get(unsupported)
    if value in (None, False, "", [], {}) or (unsupported == "best_of" and value == 1):
      continue  # absent or the neutral value clients send by default
    raise RequestError(400, f"'{unsupported}' is not supported by this server: remove it.", unsupported)

  def field(name, kinds, default, ok, allowed):
    value = req.get(name, default)
    if type(value) not in kinds or not ok(value):  # type(), not isinstance: True is not an int here
      raise RequestError(400, f"'{name}' must be {allowed}; got {json.dumps(value)}.", name)
    return value

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
  echo = field("echo", (bool,), False, lambda v: True, "true or false")
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
      raise RequestError(400, f"prompt {i} has {len(p) - 1} tokens; this server accepts at most"
                              f" {limits.max_prompt_tokens}: shorten it.", "prompt")
  samplings = [Sampling(max_tokens, float(temperature), top_k, float(top_p), (seed + j) % 2**32)
               for j in range(n)]
  try:
    for p in ids:
      run.decoder.check(len(p), samplings[0])
  except UserError as e:
    raise RequestError(400, str(e), "max_tokens") from None
  return Request(prompts, ids, samplings, stream, tuple(stop), echo)


class BoundedServer(ThreadingHTTPServer):
  """A thread per connection, at most `max_connections` at once: one more is answered
  503 with Retry-After on the spot (no thread, no read) and closed."""

  daemon_threads = True

  def __init__(self, address, handler, max_connections: int):
    self._slots = threading.BoundedSemaphore(max_connections)
    self.max_connections = max_connections
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
        self._json(200, {"status": "ok", "model": model_name, "step": run.step, "queued": engine.queued()})
      elif path == "/v1/models":
        self._json(200, {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "tpu_lm"}]})
      else:
        self._error(404, f"no route GET {self.path}: use POST /v1/completions, GET /v1/models or GET /health.")

    def do_POST(self):
      path = self.path.split("?")[0]
      if path == "/v1/chat/completions":
        # Chat needs the template an instruction-tuned run was trained with; runs
        # record none yet, and guessing one would feed the model text it never saw.
        self.close_connection = True
        self._error(400, "this run has no chat template (tpu_lm runs record none yet), so chat completions"
                         " are not served: send the conversation as a prompt to POST /v1/completions.")
        return
      if path != "/v1/completions":
        self._error(404, f"no route POST {self.path}: use POST /v1/completions.")
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
        request = parse_request(body, run, limits)
      except RequestError as e:
        self._error(e.status, str(e), e.param)
        return
      self._complete(request)

    def do_PUT(self):
      self._error(405, f"method PUT is not allowed on {self.path}: use POST /v1/completions.")

    do_DELETE = do_PATCH = do_PUT

    def _complete(self, request: Request) -> None:
      ids, samplings, stream = request.ids, request.samplings, request.stream
      events: queue.Queue = queue.Queue()
      cancelled = threading.Event()
      jobs = [Job(i * len(samplings) + j, p, s, events, cancelled)
              for i, p in enumerate(ids) for j, s in enumerate(samplings)]
      try:
        engine.submit(jobs)
      except Busy as e:
        self._error(429, f"the server is busy ({e.queued} sequences waiting): retry after {e.retry_after_s} s.",
                    headers={"Retry-After": str(e.retry_after_s)})
        return
      deadline = time.time() + limits.timeout_s
      head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
              "created": int(time.time()), "model": model_name}
      streams = {j.index: TextStream(run.tokenizer) for j in jobs}
      # Per choice: text held back while it could be the start of a stop sequence.
      stops = {j.index: StopScanner(request.stop) for j in jobs}
      echoes = {j.index: request.prompts[j.index // len(samplings)] if request.echo else "" for j in jobs}
      results, started = {}, False
      try:
        while len(results) < len(jobs):
          try:
            kind, index, payload = events.get(timeout=max(0.0, deadline - time.time()))
          except queue.Empty:
            cancelled.set()
            message = f"the request did not finish within {limits.timeout_s:g} s: ask for fewer tokens or retry."
            if started:
              self._event({"error": {"message": message, "type": "timeout", "code": 504}})
            else:
              self._error(504, message)
            return
          if kind == "error":
            cancelled.set()
            if started:
              self._event({"error": {"message": payload, "type": "server_error", "code": 500}})
            else:
              self._error(500, payload)
            return
          if kind == "token" and stream:
            if not started:
              self._start_stream()
              started = True
            text = stops[index].push(streams[index].push(payload))
            if text or echoes[index]:
              self._event({**head, "choices": [_choice(index, echoes[index] + text, None)]})
              echoes[index] = ""
          elif kind == "done":
            results[index] = payload
            if stream:
              if not started:
                self._start_stream()
                started = True
              text = "".join(stops[index].push(streams[index].push(t))  # any not streamed yet
                             for t in payload.tokens[streams[index].num_tokens:])
              text += stops[index].push(streams[index].finish()) + stops[index].finish()
              reason = "stop" if stops[index].stopped else payload.finish_reason
              self._event({**head, "choices": [_choice(index, echoes[index] + text, reason)]})
        if stream:
          self.wfile.write(b"data: [DONE]\n\n")
          self.wfile.flush()
          return
        prompt_tokens = sum(len(p) - 1 for p in ids) * len(samplings)
        completion_tokens = sum(len(c.tokens) for c in results.values())
        self._json(200, {
            **head,
            "choices": [_final_choice(i, request, run.tokenizer.decode(results[i].tokens), results[i].finish_reason,
                                      len(samplings)) for i in sorted(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })
      except (BrokenPipeError, ConnectionResetError, TimeoutError):
        # The client left or stopped reading for read_timeout_s: its rows are dropped.
        cancelled.set()
        self.close_connection = True

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


def _final_choice(index: int, request: Request, text: str, finish_reason: str, n: int) -> dict:
  cut = first_stop(text, request.stop) if request.stop else None
  if cut is not None:
    text, finish_reason = text[:cut], "stop"
  if request.echo:
    text = request.prompts[index // n] + text
  return _choice(index, text, finish_reason)


def _choice(index: int, text: str, finish_reason: str | None) -> dict:
  return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
