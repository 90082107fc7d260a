"""The server's limits under misbehaving clients, in process over a model that decodes
on command: a full queue gets 429 with Retry-After, half a body 408 after the read
timeout, half a request line 408 after the (shorter) header timeout, a connection over
the limit 503 and one over a client's share 429, a request whose client left is
cancelled at the next step, and the others are served meanwhile; the API key.

The tests talk HTTP to a port; `serving` is the one place that builds the server, so
they can run against another server unchanged."""

import contextlib
import dataclasses
import http.client
import json
import select
import socket
import threading
import time
import types

import numpy as np
import pytest

from tpu_lm.data.tokenizer import ByteTokenizer
from tpu_lm.inference.engine import Engine
from tpu_lm.inference.slots import TOP_LOGPROBS, StepOut
from tpu_lm.serving.app import create_app
from tpu_lm.serving.requests import Limits
from tpu_lm.serving.server import Server
from tpu_lm.tasks import instructions

TOKENIZER = ByteTokenizer()


class GatedSlots:
  """Every sequence decodes "ok" then end-of-sequence (`endless`: "o" until its
  max_tokens), a token a step, while `gate` is set; a test holds the sequences in
  flight by clearing it, and lets them on a step at a time with `allow`."""

  max_len, eos_id, vocab_size = 64, 2, TOKENIZER.vocab_size
  cfg = types.SimpleNamespace(vision=None)  # the model reads no images

  def __init__(self, endless: bool = False):
    self.endless = endless
    self.gate = threading.Event()
    self.busy = threading.Event()  # a step is under way
    self.steps = 0  # steps taken
    self._allowed = threading.Semaphore(0)

  def allow(self, steps: int = 1) -> None:
    for _ in range(steps):
      self._allowed.release()

  def check(self, prompt_len, sampling):
    pass

  def reset(self):
    pass

  def fit(self, rows, length):
    pass

  def prefill(self, slot, ids, image=None):
    pass

  def step(self, rows):
    self.busy.set()
    deadline = time.monotonic() + 30
    while not self.gate.is_set() and not self._allowed.acquire(timeout=0.01) and time.monotonic() < deadline:
      pass
    self.steps += 1
    o, k = (int(t) for t in TOKENIZER.encode_batch(["ok"])[0])
    tokens = np.array([o if self.endless else [o, k, self.eos_id][min(r.index, 2)] for r in rows])
    if not any(r.logprobs for r in rows):
      return StepOut(tokens)
    top = np.stack([tokens, *(tokens + i for i in range(1, TOP_LOGPROBS))], axis=1)  # the drawn one likeliest
    top_logprobs = np.tile(-0.5 * np.arange(1, TOP_LOGPROBS + 1), (len(rows), 1))
    return StepOut(tokens, np.full(len(rows), -0.5), top, top_logprobs)


@dataclasses.dataclass
class Served:
  port: int
  decoder: GatedSlots
  engine: Engine


def _uniform_scores(sequences, top=0):
  """What the fake model says of a prompt's tokens: every one of the 259 equally likely."""
  from tpu_lm.inference.score import Scored

  lp = -float(np.log(259))
  return [Scored(np.full(len(s) - 1, lp), np.zeros((len(s) - 1, top), np.int32), np.full((len(s) - 1, top), lp))
          for s in sequences]


@contextlib.contextmanager
def serving(decoder: GatedSlots | None = None, *, api_key: str | None = None, max_connections: int = 4,
            max_connections_per_client: int = 8, max_queue: int = 2, **limits):
  """The server over `decoder` (a GatedSlots), in this process, on a free port of
  127.0.0.1; `limits` override Limits' fields. The run is instruction-tuned ("Q:
  {prompt}"), so chat completions are served too."""
  decoder = decoder or GatedSlots()
  config = types.SimpleNamespace(data=types.SimpleNamespace(dataset="instructions", chat_template="Q: {prompt}"))
  run = types.SimpleNamespace(workdir="/runs/fake", step=1, tokenizer=TOKENIZER, decoder=decoder, config=config,
                              max_len=decoder.max_len, vocab_size=decoder.vocab_size,
                              objective=instructions.Instructions(chat_template=config.data.chat_template),
                              encode_prompt=lambda text: [TOKENIZER.bos_id, *TOKENIZER.encode_batch([text])[0]],
                              score=_uniform_scores)
  limits = Limits(**{**dict(max_prompt_tokens=32, max_new_tokens=16, max_body_bytes=2000, timeout_s=30, max_batch=2,
                            read_timeout_s=1.0), **limits})
  engine = Engine(run, max_batch=limits.max_batch, max_queue=max_queue, slots=decoder)
  server = Server(create_app(run, engine, limits, api_key), "127.0.0.1", 0, max_connections=max_connections,
                  max_per_client=max_connections_per_client, header_timeout_s=limits.header_timeout_s,
                  write_timeout_s=limits.read_timeout_s, grace_s=0)
  try:
    with server.started():
      yield Served(server.address[1], decoder, engine)
  finally:
    decoder.gate.set()
    engine.close(grace_s=0)


@pytest.fixture
def server():
  with serving() as s:
    yield s.port, s.decoder, s.engine


def request(port, method="POST", path="/v1/completions", body=None, headers=None, source="127.0.0.1", timeout=30):
  """(status, headers (names in any case), JSON body) of one request from address `source`."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
  conn.request(method, path, body=None if body is None else json.dumps(body),
               headers={"Content-Type": "application/json", **(headers or {})})
  resp = conn.getresponse()
  out = resp.status, resp.headers, json.loads(resp.read() or b"{}")  # headers: names in any case
  conn.close()
  return out


def _post(port, body, timeout=30):
  return request(port, body=body, timeout=timeout)


def _read_all(sock) -> str:
  """What the server sends until it closes the connection."""
  chunks = []
  while chunk := sock.recv(4096):
    chunks.append(chunk)
  return b"".join(chunks).decode()


def _in_background(fn, *args):
  result = {}
  thread = threading.Thread(target=lambda: result.setdefault("value", fn(*args)), daemon=True)
  thread.start()
  return thread, result


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_are_served(server):
  port, decoder, engine = server
  first = _in_background(_post, port, {"prompt": "a", "n": 2})  # the batch in flight
  assert decoder.busy.wait(10)
  queued = _in_background(_post, port, {"prompt": "b", "n": 2})  # fills the queue (2)
  deadline = time.time() + 10
  while engine.queued() < 2 and time.time() < deadline:
    time.sleep(0.02)
  status, headers, body = _post(port, {"prompt": "c"})
  assert status == 429, body
  assert int(headers["Retry-After"]) >= 1
  assert "the server is busy (2 sequences waiting): retry after" in body["error"]["message"]
  decoder.gate.set()
  for thread, result in (first, queued):
    thread.join(30)
    assert result["value"][0] == 200
    assert [c["text"] for c in result["value"][2]["choices"]] == ["ok", "ok"]


def test_half_a_body_gets_408_after_the_read_timeout_while_others_are_served(server):
  port, decoder, _ = server
  decoder.gate.set()
  half = socket.create_connection(("127.0.0.1", port), timeout=10)
  half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
  t0 = time.time()
  assert _post(port, {"prompt": "meanwhile"})[0] == 200  # not stalled by the half-open client
  reply = _read_all(half)
  assert reply.startswith("HTTP/1.1 408"), reply
  assert "did not arrive within 1 s" in reply
  assert time.time() - t0 < 5
  half.close()


def test_connections_over_the_limit_get_503(server):
  port, decoder, _ = server
  decoder.gate.set()
  idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]  # each holds a slot
  time.sleep(0.2)
  extra = socket.create_connection(("127.0.0.1", port), timeout=10)
  reply = _read_all(extra)
  assert reply.startswith("HTTP/1.1 503") and "Retry-After: 1" in reply, reply
  for s in idle:
    s.close()
  extra.close()
  deadline = time.time() + 10  # the idle ones time out or close; a slot frees
  while time.time() < deadline:
    try:
      if _post(port, {"prompt": "again"}, timeout=5)[0] == 200:
        break
    except (ConnectionError, http.client.HTTPException):
      pass
    time.sleep(0.1)
  else:
    raise AssertionError("no slot came free after the idle connections closed")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_request_whose_client_left_is_cancelled_at_the_next_step(stream):
  """A 16-token request, held a step at a time, whose client closes the socket during
  the first step: its sequence leaves the batch within a step or two, not after its 16
  (a whole answer ran to its end, and was logged 200)."""
  with serving(GatedSlots(endless=True)) as s:
    client = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    body = json.dumps({"prompt": "a", "max_tokens": 16, "stream": stream}).encode()
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert s.decoder.busy.wait(10)  # the first step is under way
    client.close()
    for _ in range(15):
      s.decoder.allow()
      time.sleep(0.05)  # the step's token reaches the handler, which finds the client gone
      if s.engine.running() == 0:
        break
    assert s.engine.running() == 0
    assert s.decoder.steps < 16


def test_a_pipelined_request_is_not_taken_for_a_close():
  with serving() as s:
    s.decoder.gate.set()
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as client:
      body = json.dumps({"prompt": "a"}).encode()
      client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                     + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
      reply = _read_all(client)
    assert reply.startswith("HTTP/1.1 200") and '"text":"ok"' in reply, reply


def test_idle_connections_over_a_clients_share_get_429_and_do_not_block_another_client():
  with serving(max_connections=4, max_connections_per_client=2) as s:
    s.decoder.gate.set()
    idle = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(2)]  # one client's share
    time.sleep(0.2)
    extra = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(3)]
    for sock in extra:
      reply = _read_all(sock)
      assert reply.startswith("HTTP/1.1 429") and "Retry-After: 1" in reply and "per client" in reply, reply
    # Another address (all of 127/8 is this machine) is served, while the first client's idle connections stay open.
    status, _, body = request(s.port, body={"prompt": "b"}, source="127.0.0.2", timeout=10)
    assert (status, body["choices"][0]["text"]) == (200, "ok")
    for sock in idle + extra:
      sock.close()


def test_the_request_line_and_headers_must_arrive_within_the_header_timeout():
  with serving(read_timeout_s=30.0, header_timeout_s=0.5) as s:
    s.decoder.gate.set()
    # Half a request line, then nothing: 408 after the header timeout, long before the body's.
    half = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    half.sendall(b"POST /v1/compl")
    reply = _read_all(half)
    assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in reply, reply
    # Nothing at all: closed (no request, nothing to answer).
    idle = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    assert _read_all(idle) == ""
    # Headers trickled a byte at a time: the deadline is for all of them, not for each read.
    slow = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    headers = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: %s\r\n" % (b"p" * 200)
    sent = 0
    while sent < len(headers) and not select.select([slow], [], [], 0.05)[0]:
      slow.sendall(headers[sent: sent + 1])
      sent += 1
    assert sent < len(headers)
    assert _read_all(slow).startswith("HTTP/1.1 408")
    for sock in (half, idle, slow):
      sock.close()
    assert request(s.port, "GET", "/health", timeout=10)[0] == 200


def test_request_and_log_lines_escape_control_characters(capsys):
  """A raw control character in the request line is refused (400) by the HTTP parser;
  one sent percent-encoded reaches the app (404); neither reaches the log unescaped."""
  with serving() as s:
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
      sock.sendall(b"GET /\x1b[31mred\x07 HTTP/1.1\r\nHost: x\r\n\r\n")
      assert _read_all(sock).startswith("HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
      sock.sendall(b"GET /%1b[31mred%07 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
      assert _read_all(sock).startswith("HTTP/1.1 404")
  err = capsys.readouterr().err
  lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
  assert [(line["status"], line["path"]) for line in lines] == [(400, None), (404, "/\x1b[31mred\x07")], err
  assert "\x1b" not in err and "\x07" not in err, err


def test_an_api_key_is_needed_on_every_route_but_health():
  key = "sk-test-0123"
  with serving(api_key=key) as s:
    s.decoder.gate.set()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}, {"Authorization": f"Basic {key}"},
                    {"Authorization": f"Bearer {key}x"}, {"Authorization": "Bearer \u00e9"}):
      status, got, body = request(s.port, body={"prompt": "a"}, headers=headers, timeout=10)
      assert status == 401 and got.get("WWW-Authenticate") == "Bearer", (headers, status, body)
      assert body["error"]["type"] == "authentication_error" and "Authorization: Bearer" in body["error"]["message"]
    assert request(s.port, "GET", "/v1/models", timeout=10)[0] == 401
    assert request(s.port, "GET", "/health", timeout=10)[0] == 200
    status, _, body = request(s.port, body={"prompt": "a"}, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert (status, body["choices"][0]["text"]) == (200, "ok")
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key=key, max_retries=0)
    assert client.completions.create(model="m", prompt="a", max_tokens=4).choices[0].text == "ok"
    with pytest.raises(openai.AuthenticationError, match="a valid API key is required"):
      openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="nope", max_retries=0).models.list()


def test_metrics_scrape_as_prometheus_text_and_count_what_was_served():
  from prometheus_client.parser import text_string_to_metric_families

  with serving() as s:
    s.decoder.gate.set()
    assert request(s.port, body={"prompt": "a", "n": 2})[0] == 200
    assert request(s.port, body={"prompt": "a", "n": 9})[0] == 400
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
               for f in text_string_to_metric_families(resp.read().decode()) for m in f.samples}
  requests = lambda status: samples[("tpu_lm_requests_total", (  # noqa: E731
      ("method", "POST"), ("route", "/v1/completions"), ("status", status)))]
  assert requests("200") == 1 and requests("400") == 1
  assert samples[("tpu_lm_generated_tokens_total", ())] == 6  # "o", "k", end-of-sequence, twice
  assert samples[("tpu_lm_prompt_tokens_total", ())] == 2
  assert samples[("tpu_lm_time_to_first_token_seconds_count", ())] == 1  # per request
  assert samples[("tpu_lm_inter_token_latency_seconds_count", ())] == 2  # "o" to "k" in each sequence
  assert samples[("tpu_lm_queue_depth", ())] == 0 and samples[("tpu_lm_running_sequences", ())] == 0


def test_each_request_leaves_one_json_access_log_line(capsys):
  with serving() as s:
    s.decoder.gate.set()
    status, _, body = request(s.port, body={"prompt": "ab", "max_tokens": 5})
    assert status == 200
  [line] = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
  assert {k: line[k] for k in ("id", "method", "path", "status", "prompt_tokens", "completion_tokens")} == {
      "id": body["id"], "method": "POST", "path": "/v1/completions", "status": 200, "prompt_tokens": 2,
      "completion_tokens": 3}
  assert 0 <= line["ttft_s"] <= line["total_s"] and line["client"] == "127.0.0.1"


def test_the_schema_is_published_and_responses_follow_it():
  from tpu_lm.serving import schema

  with serving(api_key="k") as s:
    s.decoder.gate.set()
    auth = {"Authorization": "Bearer k"}
    status, _, spec = request(s.port, "GET", "/openapi.json")  # open, as /docs is: the schema is no secret
    assert status == 200
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/CompletionRequest"}
    fields = spec["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "temperature", "suffix", "logprobs"} <= set(fields)
    assert fields["temperature"]["maximum"] == 100 and spec["components"]["schemas"]["CompletionRequest"][
        "required"] == ["prompt"]
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
    conn.request("GET", "/docs")
    resp = conn.getresponse()
    assert resp.status == 200 and b"/openapi.json" in resp.read()
    assert request(s.port, "GET", "/metrics")[0] == 401
    # What the server answers is what the schema says.
    status, _, out = request(s.port, body={"prompt": "a", "logprobs": 2, "echo": True, "max_tokens": 3}, headers=auth)
    assert status == 200 and schema.Completion.model_validate(out).usage.completion_tokens == 3
    status, _, out = request(s.port, path="/v1/chat/completions", headers=auth, body={
        "messages": [{"role": "user", "content": "a"}], "logprobs": True, "top_logprobs": 2})
    assert status == 200 and schema.ChatCompletion.model_validate(out).choices[0].message.content == "ok"
    status, _, out = request(s.port, body={"prompt": "a", "n": 9}, headers=auth)
    assert status == 400 and schema.ErrorResponse.model_validate(out).error.param == "n"
    for path, model in (("/health", schema.Health), ("/v1/models", schema.ModelList)):
      model.model_validate(request(s.port, "GET", path, headers=auth)[2])


def test_bodies_that_no_limit_would_bound_are_refused_unread():
  """A chunked body (h11 frames it by its chunks even beside a Content-Length, so no
  size limit bounds it) gets 411; a GET announcing a body it does not send gets 408 at
  the body's deadline and the connection closes, instead of staying open in the middle
  of a request."""
  with serving() as s:
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
      sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nTransfer-Encoding: chunked"
                   b"\r\n\r\n7d0\r\n" + b"x" * 2000 + b"\r\n")
      reply = _read_all(sock)
      assert reply.startswith("HTTP/1.1 411") and "not Transfer-Encoding" in reply, reply
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
      sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
      reply = _read_all(sock)  # the read timeout is 1 s here
      assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply, reply
