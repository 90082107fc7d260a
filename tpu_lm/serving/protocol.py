"""uvicorn's HTTP/1.1 protocol (h11) with the limits a connection needs before an ASGI
app can see it: what happens between accept() and a parsed request, and at the close.

- **Connections.** At most `max_connections` at once and `max_per_client` (0: no
  cap) from one address: one more is answered on the spot, before anything is read,
  503 (or 429 over the address's share) with Retry-After, and closed. So idle
  connections from one client cannot starve the others. (uvicorn's own
  limit_concurrency answers only once a request arrives, in plain text.)
- **Header deadline.** The request line and headers must arrive within
  `header_timeout_s` of the connection opening (or of the previous answer): a deadline
  for all of them, not a timeout per read, so a client trickling a byte at a time
  cannot hold the connection. A request begun and not finished gets 408; an idle
  connection is closed.
- **Malformed requests** (h11 refuses them) get a JSON 400, not uvicorn's plain text.
- **A body cut short.** A client that half-closes before the body it announced is
  answered (the app sees the body end early and says so), not dropped; end of input
  at any other time is the client gone, and cancels its request.
- **Stalled readers.** A client that stops reading (the write buffer stays full) for
  `write_timeout_s` is disconnected, which cancels its request.
- **Lingering close.** A connection closed with a request body unread (refused with
  413 or 401, or on accept) first shuts its write side and reads what the client still sends for at
  most LINGER_S: closing with unread bytes would reset the connection, which can
  discard the answer before the client reads it.
"""

import asyncio
import collections
import json
import sys

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from tpu_lm.serving.body import error_body
from tpu_lm.serving.guard import log_line

LINGER_S = 1.0


def raw_response(status: int, message: str, headers: dict | None = None) -> bytes:
  """A whole HTTP/1.1 error response with a JSON body, closing the connection."""
  body = json.dumps(error_body(status, message)).encode()
  head = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
          **(headers or {})}
  lines = [f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}"] + [f"{k}: {v}" for k, v in head.items()]
  return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def protocol_class(max_connections: int, max_per_client: int, header_timeout_s: float, write_timeout_s: float,
                   log=None):
  """The protocol class for uvicorn's Config(http=...), with these limits; its
  connections from each address are counted across the server. Its refusals go to
  the access log `log` (default stderr) as the app's answers do."""
  per_client: collections.Counter = collections.Counter()
  return type("GuardedH11Protocol", (GuardedH11Protocol,), dict(
      max_connections=max_connections, max_per_client=max_per_client, header_timeout_s=header_timeout_s,
      write_timeout_s=write_timeout_s, per_client=per_client, lingering_refusals=[0], log=log))


class GuardedH11Protocol(H11Protocol):
  max_connections: int
  max_per_client: int
  header_timeout_s: float
  write_timeout_s: float
  per_client: collections.Counter
  lingering_refusals: list  # [count], shared by the server's connections
  log = None

  def connection_made(self, transport) -> None:
    self._refused, self._client, self._lingering = False, None, False
    self._header_timer = self._write_timer = None
    self._received = False  # bytes of a request that has not arrived whole
    peer = transport.get_extra_info("peername")
    client = peer[0] if peer else "unknown"
    refusal = None
    if self.max_per_client and self.per_client[client] >= self.max_per_client:
      refusal = (429, f"your address has {self.max_per_client} connections open, the limit per client: close one,"
                      " or retry in a second.")
    elif len(self.connections) >= self.max_connections:
      refusal = (503, f"the server has {self.max_connections} connections open, its limit: retry in a second.")
    if refusal:
      self._refused = True
      self._log(client, *refusal)
      transport.write(raw_response(*refusal, headers={"Retry-After": "1"}))
      # Linger, so that a request already sent does not reset the answer away; but not
      # for more refused connections than the server's limit (a flood closes at once).
      if transport.can_write_eof() and self.lingering_refusals[0] < self.max_connections:
        self.lingering_refusals[0] += 1
        transport.write_eof()
        self.loop.call_later(LINGER_S, self._end_refusal, transport)
      else:
        transport.close()
      return
    self._client = client
    self.per_client[client] += 1
    super().connection_made(_Lingering(transport, self))
    self._arm_header_deadline()

  def _end_refusal(self, transport) -> None:
    self.lingering_refusals[0] -= 1
    transport.close()

  def connection_lost(self, exc) -> None:
    if self._refused:
      return
    for timer in (self._header_timer, self._write_timer):
      if timer is not None:
        timer.cancel()
    if self._client is not None:
      self.per_client[self._client] -= 1
      if not self.per_client[self._client]:
        del self.per_client[self._client]
      self._client = None
    super().connection_lost(exc)

  def data_received(self, data: bytes) -> None:
    if self._refused or self._lingering:
      return  # read and dropped
    if self.conn.their_state is h11.IDLE:
      self._received = True
    super().data_received(data)
    if self.conn.their_state is not h11.IDLE and self._header_timer is not None:  # the request arrived
      self._header_timer.cancel()
      self._header_timer, self._received = None, False

  def eof_received(self):
    if self._refused or self._lingering:
      return None
    cycle = self.cycle
    if cycle is not None and not cycle.response_complete and cycle.more_body and \
        self.conn.their_state is h11.SEND_BODY:
      cycle.more_body = False  # the body ends short of its Content-Length: the app answers that
      cycle.message_event.set()
      return True  # keep the write side open for the answer
    return None  # the client is gone: the transport closes, and its request is cancelled

  def on_response_complete(self) -> None:
    if self.conn.their_state is h11.SEND_BODY:  # answered before its body was read (the Guard refuses
      self.transport.close()  # such requests with Connection: close; this is the backstop): lingers
      return
    super().on_response_complete()
    if not self.transport.is_closing():
      self._arm_header_deadline()  # the next request's headers

  def send_400_response(self, msg: str) -> None:
    """h11 refused the request (called while its RemoteProtocolError is handled)."""
    error = sys.exc_info()[1]
    status = getattr(error, "error_status_hint", 400)
    status = status if status in STATUS_PHRASES and 400 <= status < 500 else 400
    reason = str(error) if error is not None else ""
    reason = f" ({reason if len(reason) <= 120 else reason[:117] + '...'})" if reason else ""
    self._answer_and_close(status, f"the request is not valid HTTP/1.1{reason}: send a request line"
                                   " 'METHOD /path HTTP/1.1' and well-formed headers.")

  def pause_writing(self) -> None:
    super().pause_writing()
    if self._write_timer is None:
      self._write_timer = self.loop.call_later(self.write_timeout_s, self._stalled)

  def resume_writing(self) -> None:
    super().resume_writing()
    if self._write_timer is not None:
      self._write_timer.cancel()
      self._write_timer = None

  def _stalled(self) -> None:
    self._write_timer = None
    self.transport.abort()  # connection_lost marks the request's client gone

  def _arm_header_deadline(self) -> None:
    if self._header_timer is not None:
      self._header_timer.cancel()
    self._received = False
    self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

  def _header_deadline(self) -> None:
    self._header_timer = None
    if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
      return
    if self._received or self.conn.trailing_data[0]:
      self._answer_and_close(408, f"the request line and headers did not arrive within {self.header_timeout_s:g} s.")
    else:
      self.transport.close()  # idle: nothing to answer

  def _answer_and_close(self, status: int, message: str) -> None:
    self._log(self._client, status, message)
    self.transport.write(raw_response(status, message))
    self.transport.close()


  def _log(self, client, status: int, message: str) -> None:
    log_line(self.log or sys.stderr, id=None, client=client, method=None, path=None, status=status, refused=message)


class _Lingering:
  """The connection's transport, whose close() lingers while a request body is unread
  (see the module's docstring); everything else is the transport's."""

  def __init__(self, transport, protocol: GuardedH11Protocol):
    self._transport, self._protocol = transport, protocol

  def __getattr__(self, name):
    return getattr(self._transport, name)

  def is_closing(self) -> bool:
    return self._protocol._lingering or self._transport.is_closing()

  def close(self) -> None:
    protocol, transport = self._protocol, self._transport
    if protocol._lingering or transport.is_closing():
      return
    # A body not read to its end, or bytes of a request refused (malformed, too slow).
    unread = protocol.conn.their_state in (h11.SEND_BODY, h11.ERROR) or protocol._received
    if not unread or not transport.can_write_eof():
      transport.close()
      return
    protocol._lingering = True
    transport.write_eof()  # the answer goes out, then the write side closes
    transport.resume_reading()
    protocol.loop.call_later(LINGER_S, transport.close)
