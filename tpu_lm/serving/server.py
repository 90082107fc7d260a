"""The app (app.py) served by uvicorn over the guarded HTTP/1.1 protocol (protocol.py):
`Server` binds its socket first (so a port taken is one sentence, and port 0's pick
is known before it serves), then runs uvicorn in this thread (`serve`, the CLI: its
signals stop it) or in a background thread (`started`, the tests)."""

import contextlib
import logging
import signal
import socket
import threading
import time

import uvicorn

from tpu_lm.serving.protocol import protocol_class

BACKLOG = 2048


class Server:
  def __init__(self, app, host: str, port: int, *, max_connections: int, max_per_client: int,
               header_timeout_s: float, write_timeout_s: float, grace_s: float = 30.0):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    self.socket = socket.create_server((host, port), family=family, backlog=BACKLOG)  # OSError: the caller says it
    self.address = self.socket.getsockname()[:2]
    config = uvicorn.Config(
        app, http=protocol_class(max_connections, max_per_client, header_timeout_s, write_timeout_s),
        loop="asyncio", lifespan="off", ws="none", log_config=None, access_log=False, server_header=False,
        # The protocol's header deadline closes idle connections; uvicorn's keep-alive timer is the backstop.
        timeout_keep_alive=header_timeout_s + 1,
        # Requests in flight at shutdown get grace_s to finish (then the engine cancels them); their last bytes then.
        timeout_graceful_shutdown=grace_s + 10)
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)  # requests are logged as JSON by the Guard
    self._uvicorn = _Uvicorn(config)

  def serve(self, on_exit=None) -> None:
    """Serves until SIGTERM or Ctrl-C; on the signal, `on_exit` runs in a thread (it
    waits for the requests in flight) while uvicorn stops accepting and lets them end."""
    self._uvicorn.on_exit = on_exit
    self._uvicorn.run(sockets=[self.socket])
    self.socket.close()
    if self._uvicorn.exit_thread is not None:
      self._uvicorn.exit_thread.join()

  @contextlib.contextmanager
  def started(self):
    """Serving in a background thread for the duration (tests, notebooks)."""
    thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.socket]}, daemon=True)
    thread.start()
    while not self._uvicorn.started:
      if not thread.is_alive():
        raise RuntimeError("the server thread ended before it started serving")
      time.sleep(0.01)
    try:
      yield self
    finally:
      self._uvicorn.should_exit = True
      thread.join(30)
      self.socket.close()


class _Uvicorn(uvicorn.Server):
  on_exit = exit_thread = None
  _exiting = False

  @contextlib.contextmanager
  def capture_signals(self):
    """uvicorn's, without raising the signal again after shutdown: the CLI reports
    what it did with the requests in flight, and exits 0."""
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in handlers.items():
        signal.signal(sig, handler)

  def handle_exit(self, sig, frame) -> None:
    super().handle_exit(sig, frame)
    if self.on_exit is not None and not self._exiting:
      self._exiting = True
      self.exit_thread = threading.Thread(target=self.on_exit, daemon=True)
      self.exit_thread.start()
