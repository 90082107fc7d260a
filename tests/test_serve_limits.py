"""The server's limits under misbehaving clients, in process over a model that decodes
on command: a full queue gets 429 with Retry-After, half a body 408 after the read
timeout, a connection over the limit 503, and the others are served meanwhile."""

import http.client
import json
import socket
import threading
import time
import types

import numpy as np
import pytest

from tpu_lm.data.tokenizer import ByteTokenizer
from tpu_lm.inference.engine import Engine
from tpu_lm.inference.http import BoundedServer, Limits, make_handler
from tpu_lm.inference.slots import StepOut


class _GatedSlots:
  """Every sequence decodes "ok" then end-of-sequence, a token a step, while `gate` is set
  (a test holds the sequences in flight by clearing it)."""

  max_len, eos_id = 64, 2

  def __init__(self):
    self.gate = threading.Event()
    self.busy = threading.Event()  # a step is under way

  def check(self, prompt_len, sampling):
    pass

  def reset(self):
    pass

  def fit(self, rows, length):
    pass

  def prefill(self, slot, ids):
    pass

  def step(self, rows):
    self.busy.set()
    self.gate.wait(30)
    ok = [int(t) for t in ByteTokenizer().encode_batch(["ok"])[0]] + [self.eos_id]
    return StepOut(np.array([ok[min(r.index, 2)] for r in rows]))


@pytest.fixture
def server():
  tok = ByteTokenizer()
  decoder = _GatedSlots()
  run = types.SimpleNamespace(workdir="/runs/fake", step=1, tokenizer=tok, decoder=decoder,
                              encode_prompt=lambda text: [tok.bos_id, *tok.encode_batch([text])[0]])
  limits = Limits(max_prompt_tokens=32, max_new_tokens=16, max_body_bytes=2000, timeout_s=30, max_batch=2,
                  read_timeout_s=1.0)
  engine = Engine(run, max_batch=2, max_queue=2, slots=decoder)
  srv = BoundedServer(("127.0.0.1", 0), make_handler(run, engine, limits), max_connections=4)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield srv.server_address[1], decoder, engine
  decoder.gate.set()
  srv.shutdown()
  srv.server_close()


def _post(port, body, timeout=30):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
  resp = conn.getresponse()
  out = resp.status, dict(resp.getheaders()), json.loads(resp.read() or b"{}")
  conn.close()
  return out


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
  assert reply.startswith("HTTP/1.0 408"), reply
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
  assert reply.startswith("HTTP/1.0 503") and "Retry-After: 1" in reply, reply
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
