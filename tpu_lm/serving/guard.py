"""The ASGI middleware in front of the app: what every request passes before a route
sees it, and the record each leaves.

- The API key: with one, every route but /health and the schema (/docs,
  /openapi.json) needs `Authorization: Bearer <key>` (compared in constant time);
  else 401, the body unread.
- The body: POST needs a Content-Length (411); any body is at most max_body_bytes (413,
  unread), never chunked (411), and its bytes must arrive within read_timeout_s (408);
  a client that half-closes before its announced length gets 400. The app then reads
  the body whole from memory.
- A bug of ours is a JSON 500 (and a traceback in the log), never a dropped connection.
- One access-log line per request on stderr, as JSON (so a request line's control
  characters are escaped): id, client, method, path, status, prompt and completion
  tokens, time to first token, total time, and what happened to a request that did
  not finish (cancelled, timed out). And the request's counts in /metrics.
"""

import asyncio
import hmac
import json
import sys
import time
import traceback

from tpu_lm.serving.body import error_body

OPEN_ROUTES = ("/health", "/docs", "/docs/oauth2-redirect", "/openapi.json")


class Guard:
  def __init__(self, app, *, max_body_bytes: int, read_timeout_s: float, api_key: str | None, metrics, log=None):
    self.app, self.max_body_bytes, self.read_timeout_s = app, max_body_bytes, read_timeout_s
    self.key = api_key.encode() if api_key else None
    self.metrics, self.log = metrics, log

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    start = time.monotonic()
    record = scope.setdefault("state", {}).setdefault("record", {})  # the routes add their counts here
    status = None

    async def sending(message):
      nonlocal status
      if message["type"] == "http.response.start":
        status = message["status"]
      await send(message)

    try:
      refusal = self._refusal(scope)
      if refusal is None:
        body, refusal = await self._read_body(scope, receive)
      if refusal is not None:
        await _error(sending, *refusal)
      else:
        await self.app(scope, _replay(body, receive), sending)
    except Exception:  # a bug of ours: said so, and logged
      record["error"] = traceback.format_exc()
      if status is None:
        await _error(sending, 500, "internal server error: the server's log has the details.")
    finally:
      seconds = time.monotonic() - start
      log_line(self.log or sys.stderr, id=record.pop("id", None), client=(scope.get("client") or ("-",))[0], method=scope["method"],
               path=scope["path"], status=status, **record, total_s=round(seconds, 4))
      self.metrics.answered(scope["path"], scope["method"], status or 0, seconds)

  def _refusal(self, scope) -> tuple | None:
    """(status, message, headers) of a request refused on its headers, or None."""
    if scope["http_version"] not in ("1.0", "1.1"):  # h11 parses "HTTP/2.0" text as HTTP/1 would
      return 400, f"HTTP/{scope['http_version']} was sent as HTTP/1 text: send HTTP/1.0 or HTTP/1.1.", {}
    headers = dict(scope["headers"])  # lower-case names (uvicorn)
    if self.key is not None and scope["path"] not in OPEN_ROUTES:
      scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
      if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)):
        return (401, "a valid API key is required: send the header 'Authorization: Bearer <key>' with the key the"
                     " server was started with (--api_key or TPU_LM_API_KEY).", {"www-authenticate": "Bearer"})
    length = headers.get(b"content-length")
    if b"transfer-encoding" in headers:  # a chunked body's size is not known before it is read (h11 would
      # frame it by its chunks even beside a Content-Length)
      return 411, "send the body with a Content-Length header, not Transfer-Encoding.", {}
    if length is None:
      return (411, "a Content-Length header is required.", {}) if scope["method"] == "POST" else None
    if int(length) > self.max_body_bytes:  # h11 took only digits
      return 413, f"the request body is {int(length)} bytes; the limit is {self.max_body_bytes}.", {}
    return None

  async def _read_body(self, scope, receive) -> tuple[bytes, tuple | None]:
    """The whole body, under the deadline; any method's (a GET's body, unread, would
    hold the connection in the middle of a request), though only POST routes use it."""
    length = int(dict(scope["headers"]).get(b"content-length", 0))
    if not length:
      return b"", None
    chunks, got = [], 0
    try:
      async with asyncio.timeout(self.read_timeout_s):
        while True:
          message = await receive()
          if message["type"] == "http.disconnect":
            return b"", (499, "", {})  # nobody to answer
          chunks.append(message.get("body", b""))
          got += len(chunks[-1])
          if got > length:  # h11 frames by Content-Length: never, but never buffer past it either
            return b"", (400, f"the body is longer than its Content-Length ({length} bytes).", {})
          if not message.get("more_body"):
            break
    except TimeoutError:
      return b"", (408, f"the request body ({length} bytes) did not arrive within {self.read_timeout_s:g} s: send it"
                        " whole, or raise --read_timeout_s.", {})
    if got < length:
      return b"", (400, f"the connection closed after {got} of the {length} bytes announced.", {})
    return b"".join(chunks), None


def log_line(log, **fields) -> None:
  """One access-log line: JSON, so that what a client sent (a path's control
  characters, a terminal's escape codes) is escaped, and a line is one record."""
  log.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")
  log.flush()


def _replay(body: bytes, receive):
  """The receive channel of a request whose body was read: the body once, then the
  connection's (which says when the client goes)."""
  sent = False

  async def replayed():
    nonlocal sent
    if not sent:
      sent = True
      return {"type": "http.request", "body": body, "more_body": False}
    return await receive()

  return replayed


async def _error(send, status: int, message: str, headers: dict | None = None) -> None:
  if status == 499:  # the client left mid-body: there is no one to answer
    return
  body = json.dumps(error_body(status, message)).encode()
  head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
  head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
  if status in (400, 401, 408, 411, 413):  # the body may be unread or cut: this connection serves no more
    head.append((b"connection", b"close"))
  await send({"type": "http.response.start", "status": status, "headers": head})
  await send({"type": "http.response.body", "body": body})
