"""The server's routes as an ASGI app (FastAPI): OpenAI-style /v1/completions (text or
token-id prompts, stop sequences, echo, logprobs, suffix), /v1/chat/completions
(through an instruction-tuned run's chat template), /v1/embeddings, /v1/models; the run's tokenizer
in vLLM's shapes (tokenizer_api.py); /health, /metrics (Prometheus) and the schema
(/openapi.json, /docs).

A request is parsed and checked by requests.py, against the models of schema.py that
the schema publishes; the engine (inference/engine.py, a thread) decodes, and its
events reach the request's coroutine through the event loop. A client that goes,
streamed or not, cancels its sequences at the next engine step.
"""

import asyncio
import json
import os
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException

from tpu_lm.inference.engine import Busy, Closed, Engine, Job
from tpu_lm.inference.embed import Embedder
from tpu_lm.serving import embeddings, schema, tokenizer_api
from tpu_lm.serving.body import RequestError, error_body
from tpu_lm.serving.choices import ChoiceText, choice, prompt_logprobs, speculative_usage
from tpu_lm.serving.guard import Guard
from tpu_lm.serving.metrics import CONTENT_TYPE, Metrics
from tpu_lm.serving.requests import Limits, parse_request
from tpu_lm.serving.requests import Request as Parsed

POLL_S = 0.1  # how often a request with no token event checks that its client is still there
_ERRORS = {status: {"model": schema.ErrorResponse} for status in (400, 401, 408, 411, 413, 429, 503, 504)}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_ROUTES = ("POST /v1/completions, POST /v1/chat/completions, POST /v1/embeddings, GET /v1/models, POST /tokenize,"
           " POST /detokenize, GET /tokenizer_info, GET /health, GET /metrics or GET /docs")


def create_app(run, engine: Engine | None, limits: Limits, api_key: str | None = None, log=None,
               embedding_pooling: str = "mean"):
  """The app, behind its Guard (API key, body limits, access log, metrics). `run` is a
  run_dir.Run with its `engine`, or an encoder's run_dir.EncoderRun with None."""
  model_name = f"tpu_lm/{os.path.basename(run.workdir)}@{run.step}"
  created = int(time.time())
  app = FastAPI(title="tpu_lm", version="1", description=f"An OpenAI-compatible API over {model_name}.",
                redoc_url=None)
  routes = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
            "/health", "/metrics", "/docs", "/openapi.json"}
  encoder = engine is None  # no decoding: /v1/embeddings and the tokenizer's routes only
  engine = _NoDecoding() if encoder else engine
  metrics = Metrics(engine, routes)

  @app.exception_handler(RequestError)
  async def refused(request, e: RequestError):
    return JSONResponse(error_body(e.status, str(e), e.param), e.status, headers=e.headers)

  @app.exception_handler(Exception)
  async def failed(request, e: Exception):  # a bug of ours; the Guard logs its traceback
    return JSONResponse(error_body(500, "internal server error: the server's log has the details."), 500)

  @app.exception_handler(HTTPException)
  async def unrouted(request, e: HTTPException):
    if e.status_code == 405:
      message = f"method {request.method} is not allowed on {request.url.path}: use {_ROUTES}."
    elif e.status_code == 404:
      message = f"no route {request.method} {request.url.path}: use {_ROUTES}."
    else:
      message = str(e.detail)
    return JSONResponse(error_body(e.status_code, message), e.status_code, headers=e.headers)

  @app.get("/health", response_model=schema.Health)
  async def health():
    return {"status": "ok", "model": model_name, "step": run.step, "queued": engine.queued(),
            "running": engine.running()}

  @app.get("/v1/models", response_model=schema.ModelList, responses=_ERRORS)
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "tpu_lm"}]}

  @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
  async def prometheus():
    return Response(metrics.exposition(), media_type=CONTENT_TYPE)

  @app.get("/tokenizer_info", responses=_ERRORS)
  async def tokenizer_info():
    return tokenizer_api.info(run)

  @app.post("/tokenize", response_model=schema.TokenizeResponse, responses=_ERRORS,
            openapi_extra=_body(schema.TokenizeRequest))
  async def tokenize(request: Request):
    return await asyncio.to_thread(tokenizer_api.tokenize, await request.body(), run)

  @app.post("/detokenize", response_model=schema.DetokenizeResponse, responses=_ERRORS,
            openapi_extra=_body(schema.DetokenizeRequest))
  async def detokenize(request: Request):
    return await asyncio.to_thread(tokenizer_api.detokenize, await request.body(), run)

  answer = _Answerer(run, engine, limits, metrics, model_name)
  embedders = []  # made at the first request: a server never asked compiles nothing for it

  def embed_ids(ids):
    if not embedders:
      embedders.append(Embedder(run.model, run.params, run.max_len, run.tokenizer.pad_id, pooling=embedding_pooling,
                                max_batch=limits.max_batch))
    return embedders[0].embed(ids)

  @app.post("/v1/embeddings", response_model=schema.EmbeddingList, responses=_ERRORS,
            openapi_extra=_body(schema.EmbeddingRequest))
  async def embed(request: Request):
    ids, fmt = await asyncio.to_thread(embeddings.parse, await request.body(), run, limits.max_batch)
    # Beside the engine's thread, not in it: one forward pass, no decoding slots taken.
    vectors = await asyncio.to_thread(embed_ids, ids)
    metrics.prompt_tokens.inc(sum(len(i) for i in ids))
    return embeddings.answer(vectors, ids, fmt, model_name)

  @app.post("/v1/completions", response_model=schema.Completion, responses=_ERRORS,
            openapi_extra=_body(schema.CompletionRequest))
  async def completions(request: Request):
    if encoder:
      raise _not_decoding(model_name)
    # Off the event loop: tokenizing a long prompt must not stall the streams in flight.
    return await answer(request, await asyncio.to_thread(parse_request, await request.body(), run, limits))

  @app.post("/v1/chat/completions", response_model=schema.ChatCompletion, responses=_ERRORS,
            openapi_extra=_body(schema.ChatCompletionRequest))
  async def chat_completions(request: Request):
    if encoder:
      raise _not_decoding(model_name)
    return await answer(request, await asyncio.to_thread(parse_request, await request.body(), run, limits, chat=True))

  def openapi():
    if app.openapi_schema is None:
      spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
      _, defs = models_json_schema([(m, "validation") for m in _REQUEST_MODELS],
                                   ref_template="#/components/schemas/{model}")
      spec.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
      app.openapi_schema = spec
    return app.openapi_schema

  app.openapi = openapi
  return Guard(app, max_body_bytes=limits.max_body_bytes, read_timeout_s=limits.read_timeout_s, api_key=api_key,
               metrics=metrics, log=log)


class _NoDecoding:
  """The engine of a server over an encoder: it decodes nothing, so nothing waits or runs."""

  def queued(self) -> int:
    return 0

  def running(self) -> int:
    return 0


def _not_decoding(model_name: str) -> RequestError:
  return RequestError(400, f"{model_name} is an encoder (it reads both ways and generates nothing): it answers POST"
                           " /v1/embeddings and the tokenizer's routes, not completions.")


_REQUEST_MODELS = (schema.CompletionRequest, schema.ChatCompletionRequest, schema.EmbeddingRequest,
                   schema.TokenizeRequest, schema.DetokenizeRequest)


def _body(model) -> dict:
  """The OpenAPI request body of a route that reads its JSON itself (requests.py)."""
  return {"requestBody": {"required": True, "content": {"application/json": {
      "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


class _Events:
  """A request's engine events, put by the engine's thread, read on the event loop."""

  def __init__(self):
    self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()

  def put(self, event) -> None:
    try:
      self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
    except RuntimeError:  # the loop has stopped (the server is gone): nobody is waiting
      pass

  async def get(self, timeout: float):
    return await asyncio.wait_for(self._queue.get(), timeout)

  def empty(self) -> bool:
    return self._queue.empty()


class _ClientGone(Exception):
  pass


class _Answerer:
  """Answers a parsed completions or chat request: whole, or streamed as server-sent events."""

  def __init__(self, run, engine, limits, metrics, model_name):
    self.run, self.engine, self.limits, self.metrics, self.model_name = run, engine, limits, metrics, model_name

  async def __call__(self, http: Request, request: Parsed):
    arrived = time.monotonic()
    record = http.scope["state"]["record"]
    head = {"id": f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk" if request.chat and request.stream else
                      "chat.completion" if request.chat else "text_completion",
            "created": int(time.time()), "model": self.model_name}
    record["id"] = head["id"]
    prompt_tokens = sum(len(p) - k for p, k in zip(request.ids, request.lead)) * len(request.samplings)
    record["prompt_tokens"] = prompt_tokens
    samplings = request.samplings
    scoring = request.echo and request.logprobs is not None
    # What evaluation harnesses send to score text (echo, logprobs, max_tokens 0, or 1
    # greedy) is answered from one scoring pass, without the engine.
    greedy_next = scoring and samplings[0].max_new_tokens == 1 and samplings[0].temperature == 0
    prompt_lp = await asyncio.to_thread(prompt_logprobs, self.run, request, greedy_next) if scoring else None
    if not samplings[0].max_new_tokens or greedy_next:
      self.metrics.prompt_tokens.inc(prompt_tokens)
      return self._scored(request, head, prompt_lp, prompt_tokens, record)

    events, cancelled = _Events(), threading.Event()
    jobs = [Job(i * len(samplings) + j, p, s, events, cancelled, head["id"], request.logprobs is not None,
                end_id=request.end_id, image=request.images[i] if request.images else None)
            for i, p in enumerate(request.ids) for j, s in enumerate(samplings)]
    try:
      self.engine.submit(jobs)
    except Busy as e:
      raise RequestError(429, f"the server is busy ({e.queued} sequences waiting): retry after {e.retry_after_s} s.",
                         headers={"Retry-After": str(e.retry_after_s)}) from None
    except Closed:
      raise RequestError(503, "the server is shutting down: retry on another.") from None
    self.metrics.prompt_tokens.inc(prompt_tokens)
    texts = {j.index: ChoiceText(self.run.tokenizer, request.stop,
                                 request.prompts[j.index // len(samplings)] if request.echo else "",
                                 prompt_lp[j.index // len(samplings)][0] if prompt_lp else ()) for j in jobs}
    decoding = _Decoding(self, http, request, jobs, events, cancelled, texts, arrived, record)
    watcher = asyncio.create_task(decoding.watch())
    streaming = False
    try:
      if request.stream:
        first = await decoding.next_chunk(head)  # an error before the stream starts is the response's status
        streaming = True  # the stream's generator owns the watcher now
        return StreamingResponse(decoding.stream(head, first, watcher), headers=_SSE_HEADERS)
      results = await decoding.run()
    except _ClientGone:
      return Response(status_code=499)  # not sent: the client is gone
    finally:
      if not streaming:
        watcher.cancel()
        decoding.abandon("failed")  # an exception of ours, or uvicorn's shutdown cancelling: nobody reads on
    completion_tokens = decoding.account(results)
    spec = speculative_usage(results.values())
    return JSONResponse({
        **head,
        "choices": [choice(request, i, texts[i].text, "stop" if texts[i].stopped else results[i].finish_reason,
                           texts[i].take_logprobs(request, 0), final=True) for i in sorted(results)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens, **({"speculative": spec} if spec else {})},
    })

  def _scored(self, request: Parsed, head: dict, prompt_lp, prompt_tokens: int, record: dict):
    """Echo with max_tokens 0: each choice is its prompt (with its log-probabilities,
    if asked), nothing generated; or with max_tokens 1, greedy and logprobs, the
    prompt then its likeliest next token (prompt_logprobs' greedy_next)."""
    n, tok = len(request.samplings), self.run.tokenizer
    choices, completion_tokens = [], 0
    for index in range(len(request.ids) * n):
      entries, following = prompt_lp[index // n] if prompt_lp else ((), None)
      text = ChoiceText(tok, request.stop, request.prompts[index // n], entries)
      reason = "length"
      if following is not None:
        completion_tokens += 1
        token, logprobs = following
        text.push(token, logprobs)
        reason = "stop" if text.stopped or token == tok.eos_id else "length"
      text.finish()
      choices.append(choice(request, index, text.text, reason, text.take_logprobs(request, 0), final=True))
    record["completion_tokens"] = completion_tokens
    self.metrics.generated_tokens.inc(completion_tokens)
    if request.stream:
      events = [_sse({**head, "choices": [c]}) for c in choices] + [b"data: [DONE]\n\n"]
      return StreamingResponse(iter(events), headers=_SSE_HEADERS)
    return JSONResponse({**head, "choices": choices, "usage": {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens}})


class _Decoding:
  """One request's sequences in the engine: their events turned into text, whole or as chunks."""

  def __init__(self, owner: _Answerer, http, request: Parsed, jobs, events: _Events, cancelled, texts, arrived,
               record):
    self.owner, self.http, self.request, self.events, self.cancelled = owner, http, request, events, cancelled
    self.jobs, self.by_index, self.texts, self.record = jobs, {j.index: j for j in jobs}, texts, record
    self.arrived, self.deadline = arrived, time.monotonic() + owner.limits.timeout_s
    self.results, self.drawn, self.gone, self.yielded = {}, 0, asyncio.Event(), False
    self.last_token: dict[int, float] = {}

  async def watch(self) -> None:
    """When the client disconnects (the receive channel says so): `gone`, and its
    sequences cancelled, whoever is reading their events (or nobody: a stream whose
    generator never started)."""
    try:
      while (await self.http.receive())["type"] != "http.disconnect":
        pass
    except Exception:  # the connection's channel is closed: gone too
      pass
    self.gone.set()
    self.abandon("cancelled: the client closed the connection")

  def abandon(self, why: str) -> None:
    """Cancels the sequences not yet done (once)."""
    if len(self.results) < len(self.jobs) and not self.cancelled.is_set():
      self._cancel(why)

  async def pieces(self):
    """(index, text piece, finish reason or None, logprobs or None) as tokens arrive,
    until every sequence is done. Raises RequestError (an engine error, the timeout)
    or _ClientGone."""
    request, owner = self.request, self.owner
    eos = owner.run.tokenizer.eos_id
    while len(self.results) < len(self.jobs):
      if self.gone.is_set() and self.events.empty():
        self._cancel("cancelled: the client closed the connection")
        raise _ClientGone()
      left = self.deadline - time.monotonic()
      if left <= 0:
        self._cancel("timed out")
        raise RequestError(504, f"the request did not finish within {owner.limits.timeout_s:g} s: ask for fewer"
                                " tokens or retry.")
      try:
        event = await self.events.get(min(POLL_S, left))
      except TimeoutError:
        continue
      kind, index, payload = event[:3]
      if kind == "error":
        status, message = payload
        self._cancel(f"error {status}")
        raise RequestError(status, message)
      if kind == "token":
        self._timed(index)
        if request.chat and payload == eos:
          continue  # a chat message's logprobs are its tokens', as OpenAI's: not the end-of-sequence
        text = self.texts[index]
        piece = text.push(payload, event[3])
        if text.stopped:
          self.by_index[index].halt.set()  # decoding this choice further is wasted: its slot frees
        # With logprobs, every token is an event (its text may be held back, not its logprob).
        if piece or request.logprobs is not None or (request.chat and not self.yielded):
          self.yielded = True  # a chat stream's first chunk carries the role, even with no text yet
          yield index, piece, None
      elif kind == "done":
        self.results[index] = payload
        text = self.texts[index]
        yield index, text.finish(), "stop" if text.stopped else payload.finish_reason

  def _timed(self, index: int) -> None:
    now = time.monotonic()
    self.drawn += 1
    if self.drawn == 1:
      self.record["ttft_s"] = round(now - self.arrived, 4)
      self.owner.metrics.time_to_first_token.observe(now - self.arrived)
    if index in self.last_token:
      self.owner.metrics.inter_token_latency.observe(now - self.last_token[index])
    self.last_token[index] = now

  def _cancel(self, why: str) -> None:
    if self.cancelled.is_set():  # the watcher, the reader and a failure may each get here
      return
    self.cancelled.set()
    self.record.update(outcome=why, drawn=self.drawn)
    self.owner.metrics.generated_tokens.inc(self.drawn)

  async def run(self) -> dict:
    async for _ in self.pieces():
      pass
    self._finished()
    return self.results

  def _finished(self) -> None:
    spec = speculative_usage(self.results.values())
    if spec:
      self.record["speculative"] = spec

  def account(self, results) -> int:
    """The usage's completion tokens, counted into the access log and /metrics: once,
    when every sequence is done."""
    # End-of-sequence counts as drawn (as OpenAI and vLLM count it): a "stop" without a stop sequence.
    count = sum(len(c.tokens) + (c.finish_reason == "stop" and not self.texts[i].stopped) for i, c in results.items())
    self.record["completion_tokens"] = count
    self.owner.metrics.generated_tokens.inc(count)
    return count

  async def next_chunk(self, head: dict) -> bytes | None:
    """The stream's first event (None: every sequence ended without one)."""
    self._iter = self.pieces()
    async for index, piece, reason in self._iter:
      return self._chunk(head, index, piece, reason)
    return None

  def _chunk(self, head: dict, index: int, piece: str, reason) -> bytes:
    offset = len(self.texts[index].text) - len(piece)
    return _sse({**head, "choices": [choice(self.request, index, piece, reason,
                                            self.texts[index].take_logprobs(self.request, offset))]})

  async def stream(self, head: dict, first: bytes | None, watcher):
    """The events after `first`; an error once the stream has begun is its last event."""
    try:
      if first is not None:
        yield first
        async for index, piece, reason in self._iter:
          yield self._chunk(head, index, piece, reason)
      self._finished()
      self.account(self.results)
      yield b"data: [DONE]\n\n"
    except RequestError as e:
      yield _sse({"error": error_body(e.status, str(e))["error"]})
    except _ClientGone:
      pass
    finally:
      watcher.cancel()
      self.abandon("cancelled: the client closed the connection")


def _sse(obj: dict) -> bytes:
  return b"data: " + json.dumps(obj).encode() + b"\n\n"
