"""HTTP API for a trained run: python -m tpu_lm.serve --workdir=RUN [--port=8000].

  POST /v1/completions  OpenAI-style completions; "stream": true sends server-sent events
  GET  /health          {"status": "ok", "step": ..., "queued": ...}

Requests are served together: a single engine thread takes every request that
is waiting (up to --max_batch sequences) and decodes them in one batch; the
rest queue for the next batch, and none is dropped. A malformed request gets a
4xx with a JSON error saying what was wrong, and the server keeps serving.
Bound to 127.0.0.1 unless --host says otherwise.
"""

import signal
import threading
from http.server import ThreadingHTTPServer

from tpu_lm.parallel import libtpu_env

if __name__ == "__main__":
  libtpu_env.quiet_where_no_tpu()

from absl import app, flags, logging  # noqa: E402

from tpu_lm import cli  # noqa: E402
from tpu_lm.errors import UserError, exit_with  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by python -m tpu_lm.main.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes the server to the network.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on; 0 picks a free one (printed at start).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
_TENSOR = flags.DEFINE_integer("tensor_parallel", 1, "Devices to split the model over.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 16, "Most sequences decoded together in one batch.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", 0, "Longest prompt accepted, in tokens (0: the model's context).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Largest max_tokens a request may ask for.")
_MAX_BODY = flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body accepted, in bytes.")
_TIMEOUT = flags.DEFINE_float("request_timeout_s", 120.0, "A request not finished in this many seconds gets a 504.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the full traceback of a startup error.")
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every option is a --flag.")
  logging.set_verbosity(logging.ERROR)  # Orbax warns that a read-only checkpoint dir is read-only
  try:
    for name, value in (("max_batch", _MAX_BATCH.value), ("max_new_tokens", _MAX_NEW.value),
                        ("max_body_bytes", _MAX_BODY.value)):
      if value < 1:
        raise UserError(f"--{name}={value} is invalid: it must be at least 1.")
    if _TIMEOUT.value <= 0:
      raise UserError(f"--request_timeout_s={_TIMEOUT.value} is invalid: it must be positive.")
    if not 0 <= _PORT.value < 65536:
      raise UserError(f"--port={_PORT.value} is invalid: give a port from 0 to 65535.")
    from tpu_lm.inference import run_dir
    from tpu_lm.inference.engine import Engine
    from tpu_lm.inference.http import Limits, make_handler

    run = run_dir.load(_WORKDIR.value, step=_STEP.value, tensor_parallel=_TENSOR.value)
    context = run.decoder.max_len
    limits = Limits(
        max_prompt_tokens=min(_MAX_PROMPT.value or context, context - 1),
        max_new_tokens=min(_MAX_NEW.value, context - 1), max_body_bytes=_MAX_BODY.value,
        timeout_s=_TIMEOUT.value, max_batch=_MAX_BATCH.value,
    )
    engine = Engine(run, limits.max_batch)
    try:
      server = ThreadingHTTPServer((_HOST.value, _PORT.value), make_handler(run, engine, limits))
    except OSError as e:
      raise UserError(f"cannot listen on {_HOST.value}:{_PORT.value} ({e.strerror}): pick another --port.") from None
  except UserError as e:
    if _DEBUG.value:
      raise
    exit_with(str(e))
  server.daemon_threads = True
  host, port = server.server_address[:2]
  signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
  print(f"serving {run.workdir} (step {run.step}) on http://{host}:{port}"
        f"  [context {context} tokens, max_batch {limits.max_batch}]", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  server.server_close()
  print("server stopped", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
