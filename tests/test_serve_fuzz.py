"""Hostile and malformed requests, over HTTP to the in-process server of
test_serve_limits (a fake model), to every route (the tokenizer's too): each gets a
4xx with a JSON error, or a 2xx; never a 5xx or a dropped connection, and the server
goes on serving, the request in flight included. Fuzzed with hypothesis over bodies
(any JSON, near-valid requests) and headers (Content-Length, Content-Type, method, path)."""

import http.client
import json
import math
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_serve_limits import TOKENIZER, request, serving

VOCAB = TOKENIZER.vocab_size
CHAT = {"messages": [{"role": "user", "content": "a"}]}
# The tokenizer's routes (vLLM's shapes), each field's hostile values.
TOKENIZER_HOSTILE = {
    "/tokenize": {"prompt": [None, 5, ["a"], {}, True, "\ud800"], "add_special_tokens": [1, "true", [], 0.0]},
    "/detokenize": {"tokens": [None, 5, "1", [VOCAB], [-1], [True], [1.5], [[1]], [1, None], {}]},
}
TOKENIZER_VALID = {"/tokenize": {"prompt": "a"}, "/detokenize": {"tokens": [100]}}

# Values out of range or of the wrong type for each field (max_tokens <= 16, n <= 2, prompts <= 32 tokens).
HOSTILE = {
    "max_tokens": [0, -1, 17, 2**31, 2**63, 10**30, 1.5, 4.0, True, "4", [4], {}],
    "temperature": [-1, -1e-9, 100.5, 1e308, -1e308, math.inf, math.nan, True, "1", [1]],
    "top_p": [0, -0.5, 1.5, 1e308, math.inf, math.nan, False, "1"],
    "top_k": [-1, VOCAB + 1, 2**31, 2**63, 10**30, 1.5, True, "5"],
    "n": [0, -1, 3, 2**31, 1.5, True, "1"],
    "seed": [-1, 2**32, 2**63, 10**30, 1.5, True, "1"],
    "logprobs": [-1, 6, 2**31, 1.5, True, "1"],
    "stop": [5, 10**30, -1, 1.5, "", [""], ["a"] * 5, [1], [None], True, {}],
    "echo": [1, 10**30, -1, 0.0, "true", []],
    "stream": [1, 10**30, -1, 0, 0.5, "true", []],
    "prompt": [5, -1, 1.5, True, [], {}, [["a"]], "x" * 40, "\ud800", ["a", "b\udfff"],
               # token ids: out of the vocabulary, not integers, empty, mixed, too long, too many prompts
               [1, VOCAB], [-1], [True], [1.5], [[]], [[1], []], ["a", 1], ["a", [1]], [[1], 2], [1, [2]],
               [1] * 33, [[1], [1] * 33], [[1], [2], [3]], [1, 2**63]],
    "suffix": ["x"],
    "best_of": [2],
    "logit_bias": [{"1": 5}],
}
CHAT_HOSTILE = {
    "messages": [5, [], "hi", [{"role": "robot", "content": "a"}], [{"role": "user", "content": 5}],
                 [{"role": "user", "content": "\ud800"}], [{"role": "assistant", "content": "a"}]],
    "max_completion_tokens": [0, 17, 2**31, 1.5, True],
    "max_tokens": [0, 2**63],
    "logprobs": [1, "true"],
    "top_logprobs": [-1, 6, 2**31, 1.5, True, "1"],  # with "logprobs": true
    "top_k": [2**31],
    "tools": [[{"type": "function"}]],
}


def _exchange(port: int, raw: bytes, half_close: bool = False) -> bytes:
  """Sends raw bytes; returns all the server answers until it closes the connection."""
  with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
    sock.sendall(raw)
    if half_close:  # what a client announced but will never send: the server reads the end, not a timeout
      sock.shutdown(socket.SHUT_WR)
    chunks = []
    while chunk := sock.recv(65536):
      chunks.append(chunk)
  return b"".join(chunks)


def _status(reply: bytes, head_request: bool = False) -> int:
  """The status of an answer (there must be one), checking that a 4xx carries a JSON error."""
  assert reply.startswith(b"HTTP/1."), reply[:300]
  head, _, body = reply.partition(b"\r\n\r\n")
  status = int(head.split(b" ", 2)[1])
  if 400 <= status < 500 and not head_request:
    assert json.loads(body)["error"]["message"], body[:300]
  return status


def _post(path: str, body: bytes, headers: dict | None = None) -> bytes:
  headers = {"Host": "x", "Content-Length": len(body), "Connection": "close", **(headers or {})}
  return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode() + body


@pytest.fixture
def served():
  with serving(max_connections=64, max_connections_per_client=0, max_body_bytes=1_000_000) as s:
    yield s


def test_hostile_values_for_every_field_get_a_4xx_while_a_stream_is_served(served):
  s = served
  streamed = {}

  def stream():
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "a", "max_tokens": 8, "stream": True}))
    streamed["reply"] = conn.getresponse().read()  # the events, de-chunked

  reader = threading.Thread(target=stream)
  reader.start()
  assert s.decoder.busy.wait(10)  # the stream's sequence is in flight, held at its first step
  cases = [("/v1/completions", {"prompt": "a", name: value} if name != "prompt" else {name: value})
           for name, values in HOSTILE.items() for value in values]
  cases += [("/v1/chat/completions", {**CHAT, "logprobs": True, name: value} if name == "top_logprobs" else
             {**CHAT, name: value}) for name, values in CHAT_HOSTILE.items() for value in values]
  cases += [(path, {**TOKENIZER_VALID[path], name: value}) for path, fields in TOKENIZER_HOSTILE.items()
            for name, values in fields.items() for value in values]
  for path, fields in cases:
    reply = _exchange(s.port, _post(path, json.dumps(fields).encode()))
    status = _status(reply)
    assert 400 <= status < 500, (fields, reply[:300])
  s.decoder.gate.set()
  reader.join(30)
  reply = streamed["reply"]
  events = [e[len(b"data: "):] for e in reply.split(b"\n\n") if e.startswith(b"data: ")]
  assert events[-1] == b"[DONE]"
  assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "ok"


@pytest.mark.parametrize("raw", [
    _post("/v1/completions", b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}"),  # int() refuses > 4300 digits
    _post("/v1/completions", b"[" * 100_000 + b"]" * 100_000),  # json.loads: RecursionError
    _post("/v1/completions", b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}"),  # parses; too deep to read further
    _post("/v1/completions", b'{"prompt": "a"}', {"Content-Length": "\u00b2"}),  # '²' as UTF-8
    b'POST /v1/completions HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{"prompt": "a"}',  # as latin-1: '²'.isdigit()
    _post("/v1/completions", b'{"prompt": "\\ud800"}'),  # a lone surrogate: the tokenizer cannot encode it
    _post("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}'),
    _post("/v1/completions", b'{"prompt": "a"}', {"Content-Length": "1" * 40}),
    b"BREW /v1/completions HTTP/1.1\r\n\r\n",
    b"GET /health HTTP/2.0\r\n\r\n",
    b"POST  HTTP/1.1\r\n\r\n",
    b"GET\r\n\r\n",
    # A chunked body beside a Content-Length: h11 frames it by its chunks, which no size limit would bound.
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    # A GET announcing a body it never sends: unread, it would hold the connection open mid-request.
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\nx",
], ids=["5000_digits", "nested_100000", "nested_40", "content_length_superscript_utf8",
        "content_length_superscript", "surrogate", "chat_surrogate", "content_length_40_digits", "method", "http2",
        "no_path", "no_words", "chunked_and_length", "get_with_body"])
def test_malformed_requests_get_a_json_4xx_not_a_dropped_connection(served, raw):
  assert 400 <= _status(_exchange(served.port, raw)) < 500
  assert request(served.port, "GET", "/health", timeout=10)[0] == 200


def test_null_is_the_default_for_every_field(served):
  served.decoder.gate.set()
  unset = dict.fromkeys(["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stream", "stop", "echo",
                         "logprobs", "suffix", "best_of", "logit_bias", "user"])
  status, _, body = request(served.port, body={"prompt": "a", **unset}, timeout=10)
  assert (status, [c["text"] for c in body["choices"]]) == (200, ["ok"]), body
  unset = dict.fromkeys(["max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "response_format"])
  status, _, body = request(served.port, path="/v1/chat/completions", body={**CHAT, **unset}, timeout=10)
  assert (status, body["choices"][0]["message"]["content"]) == (200, "ok"), body


_SURROGATES = st.characters(categories=["Cs"])
_TEXT = st.text(st.one_of(st.characters(), _SURROGATES), max_size=12)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2**80, 2**80) | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4), max_leaves=12)
_FIELDS = sorted({*HOSTILE, *CHAT_HOSTILE, *(n for f in TOKENIZER_HOSTILE.values() for n in f), "model", "user"})
_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8)
_VALID = st.fixed_dictionaries({"prompt": st.text(max_size=8) | _IDS | st.lists(_IDS, min_size=1, max_size=2)}, optional={
    "max_tokens": st.integers(1, 16), "temperature": st.floats(0, 2), "top_k": st.integers(0, VOCAB),
    "top_p": st.floats(0.01, 1), "n": st.integers(1, 2), "seed": st.integers(0, 2**32 - 1), "stream": st.booleans(),
    "stop": st.sampled_from(["k", ["o", "x"]]), "echo": st.booleans(), "logprobs": st.integers(0, 5)})
_CHAT_VALID = st.fixed_dictionaries({"messages": st.just(CHAT["messages"])}, optional={
    "max_completion_tokens": st.integers(1, 16), "stream": st.booleans(), "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5)})
_TOKENIZE_VALID = st.fixed_dictionaries({"prompt": _TEXT}, optional={"add_special_tokens": st.booleans()})
_DETOKENIZE_VALID = st.fixed_dictionaries({"tokens": st.lists(st.integers(0, VOCAB - 1), max_size=8)})
_NEAR_VALID = st.tuples(_VALID | _CHAT_VALID | _TOKENIZE_VALID | _DETOKENIZE_VALID, st.sampled_from(_FIELDS),
                        _JSON).map(lambda t: {**t[0], t[1]: t[2]})
_REQUESTS = st.one_of(  # a route and a body for it, valid or one field off
    st.tuples(st.just("/v1/completions"), _VALID | _NEAR_VALID),
    st.tuples(st.just("/v1/chat/completions"), _CHAT_VALID | _NEAR_VALID),
    st.tuples(st.just("/tokenize"), _TOKENIZE_VALID | _NEAR_VALID),
    st.tuples(st.just("/detokenize"), _DETOKENIZE_VALID | _NEAR_VALID),
).map(lambda t: (t[0], json.dumps(t[1]).encode()))
_BODIES = st.one_of(
    _JSON.map(json.dumps), _VALID.map(json.dumps), _CHAT_VALID.map(json.dumps), _NEAR_VALID.map(json.dumps),
    st.binary(max_size=40), st.sampled_from(['{"prompt": "a"', '{"prompt": "a"}' * 2, "\ufeff{}", '{"prompt": NaN}']),
).map(lambda b: b.encode() if isinstance(b, str) else b)
_HEADER_TEXT = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=12)
_LENGTHS = st.one_of(st.just("exact"), st.just("omit"), st.integers(-3, 2_000_000).map(str),
                     st.text("0123456789\u00b2\u0663 +-_.e", min_size=1, max_size=8), _HEADER_TEXT)
_METHODS = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "HEAD", "OPTIONS", "post", "BREW"])
_PATHS = st.one_of(
    st.sampled_from(["/v1/completions", "/v1/chat/completions", "/health", "/v1/models", "//v1/completions",
                     "/v1/completions?x=1", "*", "/", "/tokenize", "/detokenize", "/tokenizer_info"]),
    st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=16).map(lambda p: "/" + p))


def test_fuzzed_requests_get_a_4xx_or_2xx_never_a_5xx_or_a_dropped_connection(served):
  served.decoder.gate.set()

  well_formed = st.tuples(st.just("POST"), _REQUESTS, st.just("application/json"), st.just("exact"))
  fuzzed = st.tuples(_METHODS, st.tuples(_PATHS, _BODIES), st.just("application/json") | _HEADER_TEXT, _LENGTHS)

  @settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
  @given(well_formed | fuzzed)
  def exchange(case):
    method, (path, body), content_type, length = case
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Type: {content_type}", "Connection: close"]
    if length != "omit":
      lines.append(f"Content-Length: {len(body) if length == 'exact' else length}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    # A body shorter than announced ends with the client's half close, as when a client gives up.
    digits = length.strip()
    announced = len(body) if length == "exact" else int(digits) if digits.isascii() and digits.isdigit() else 0
    status = _status(_exchange(served.port, raw, half_close=announced > len(body)), head_request=method == "HEAD")
    assert status < 500, (raw[:300], status)

  exchange()
  assert request(served.port, "GET", "/health", timeout=10)[0] == 200
  assert request(served.port, body={"prompt": "a"}, timeout=10)[2]["choices"][0]["text"] == "ok"
