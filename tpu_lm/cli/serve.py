"""HTTP API for a trained run: tpu-lm serve (python -m tpu_lm.serve) --workdir=RUN [--port=8000].

  POST /v1/completions       OpenAI-style completions of text or token-id prompts (a list of
                             ints, or of such lists); "stream": true sends server-sent events;
                             "echo" + "logprobs" (and "max_tokens": 0) scores the prompt
  POST /v1/chat/completions  chat, for a run instruction-tuned here (its chat template)
  POST /v1/embeddings        unit vectors of texts or token ids: the final hidden states pooled
                             (--embedding_pooling, default their mean)
  GET  /v1/models            the one model served
  GET  /tokenizer_info       the special tokens, the context and a chat template (vLLM's shape)
  POST /tokenize, /detokenize  text <-> the run's token ids (lm-eval's remote tokenizer uses them)
  GET  /health               {"status": "ok", "step": ..., "queued": ..., "running": ...}
  GET  /metrics              Prometheus text: requests, queue, running, TTFT, inter-token latency, tokens
  GET  /docs, /openapi.json  the schema of every route (from the pydantic models that validate requests)

A FastAPI app on uvicorn (tpu_lm/serving/). One JSON access-log line per request on stderr.

Requests are decoded by continuous batching: one engine thread steps every
sequence in flight (up to --max_batch) one token at a time, and a new request
joins at the next step, a finished one leaves at once, so a short request never
waits for a long one. The rest wait, up to --max_queue sequences (more get 429
with Retry-After). A malformed request, or a field out of range (null is the
field's default), gets a 4xx with a JSON error naming it, and the server keeps
serving; a sequence that fails fails alone. A request whose client disconnects is
cancelled at the next step, streamed or not.

With --api_key (or the environment variable TPU_LM_API_KEY, which keeps the key out
of the process list) every route but GET /health and the schema needs `Authorization: Bearer KEY`
(401 otherwise). At most --max_connections connections (more get
503) and --max_connections_per_client from one address (more get 429); a request
line and headers must arrive within --header_timeout_s, its body within
--read_timeout_s (408 otherwise), and a client that stops reading a stream for
--read_timeout_s is dropped. SIGTERM (or Ctrl-C) stops accepting, gives the requests
in flight --shutdown_grace_s to finish, cancels the rest with a 503, and prints which
finished and which were cancelled. Bound to 127.0.0.1 unless --host says otherwise.
"""

import ipaddress
import os
import sys
import time

from absl import flags

from tpu_lm import cli
from tpu_lm.errors import UserError

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
_READ_TIMEOUT = flags.DEFINE_float(
    "read_timeout_s", 30.0, "A request body must arrive within this (408), and a stream write go out (else the"
    " connection is closed).")
_HEADER_TIMEOUT = flags.DEFINE_float(
    "header_timeout_s", 5.0, "The request line and headers must arrive within this (408); an idle connection is"
    " closed after it.")
_API_KEY = flags.DEFINE_string(
    "api_key", None, "Require 'Authorization: Bearer KEY' on every route but /health (default: the environment"
    " variable TPU_LM_API_KEY; neither: no key).")
_MAX_PER_CLIENT = flags.DEFINE_integer(
    "max_connections_per_client", 8, "Most connections open at once from one address; more get 429 (0: no cap,"
    " e.g. behind a proxy that is one address).")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 256, "Most sequences waiting for a batch; more get 429 + Retry-After.")
_MAX_CONN = flags.DEFINE_integer("max_connections", 64, "Most connections served at once; more get 503.")
_GRACE = flags.DEFINE_float(
    "shutdown_grace_s", 30.0, "On SIGTERM, how long requests in flight may take to finish before they are cancelled.")
_WARMUP = flags.DEFINE_bool(
    "warmup", False, "Compile the common batch and prompt shapes before listening (else the first request of a"
    " new shape waits for its compile).")
_DRAFT = flags.DEFINE_string("draft_workdir", None, "Speculative decoding: a run directory with the same tokenizer"
                             " whose model proposes tokens that --workdir's model checks (same distribution of text).")
_DRAFT_TOKENS = flags.DEFINE_integer("draft_tokens", 4, "Tokens the draft proposes per step (1 to 16), with --draft_workdir.")
_POOLING = flags.DEFINE_enum("embedding_pooling", "mean", ["mean", "first", "last"],
                             "/v1/embeddings: pool the final hidden states by their mean, the first token's (BOS) or"
                             " the last's; each vector then has unit length.")
flags.mark_flags_as_required(["workdir"])
for _holder in (_TENSOR, _MAX_BATCH, _MAX_NEW, _MAX_BODY, _MAX_QUEUE, _MAX_CONN):
  cli.at_least(_holder, 1)
for _holder in (_TIMEOUT, _READ_TIMEOUT, _HEADER_TIMEOUT):
  cli.positive(_holder)
cli.check_flag(_MAX_PER_CLIENT, lambda v: v >= 0, "it must be 0 (no cap) or more")
cli.check_flag(_GRACE, lambda v: v >= 0, "it must be 0 or more seconds")
cli.check_flag(_PORT, lambda v: 0 <= v < 65536, "give a port from 0 to 65535")
cli.check_flag(_DRAFT_TOKENS, lambda v: 1 <= v <= 16, "give an integer from 1 to 16")


def body() -> None:
  api_key = _api_key()
  from tpu_lm.inference import run_dir
  from tpu_lm.inference.engine import Engine
  from tpu_lm.inference.slots import SlotDecoder
  from tpu_lm.serving.app import create_app
  from tpu_lm.serving.requests import Limits
  from tpu_lm.serving.server import Server

  encoder = run_dir.is_encoder(_WORKDIR.value, _STEP.value)
  if encoder:
    for flag in (_DRAFT, _TENSOR, _WARMUP):
      if flags.FLAGS[flag.name].present:
        raise UserError(f"--{flag.name} is for a decoder; {_WORKDIR.value} is an encoder (task.kind='mlm'), served for"
                        " /v1/embeddings only: leave it out.")
    run = run_dir.load_encoder(_WORKDIR.value, step=_STEP.value)
  else:
    run = run_dir.load(_WORKDIR.value, step=_STEP.value, tensor_parallel=_TENSOR.value)
  context = run.max_len
  limits = Limits(
      max_prompt_tokens=min(_MAX_PROMPT.value or context, context - 1),
      max_new_tokens=min(_MAX_NEW.value, context - 1), max_body_bytes=_MAX_BODY.value,
      timeout_s=_TIMEOUT.value, max_batch=_MAX_BATCH.value, read_timeout_s=_READ_TIMEOUT.value,
      header_timeout_s=_HEADER_TIMEOUT.value,
  )
  if encoder:
    engine = None
  elif _DRAFT.value:
    from tpu_lm.inference import speculative

    spec = speculative.attach(run, _DRAFT.value, _DRAFT_TOKENS.value, tensor_parallel=_TENSOR.value)
    slots = speculative.SpeculativeSlots(spec.target, spec.draft, spec.k, limits.max_batch)
    print(f"draft {_DRAFT.value}: {spec.k} tokens a step", file=sys.stderr, flush=True)
  else:
    slots = SlotDecoder(run.decoder, limits.max_batch)
  if not encoder:
    if _WARMUP.value:
      start = time.monotonic()
      shapes = slots.warmup(limits.max_prompt_tokens)
      print(f"warmup: {shapes} shapes compiled in {time.monotonic() - start:.1f} s", flush=True)
    engine = Engine(run, limits.max_batch, max(_MAX_QUEUE.value, limits.max_batch), slots=slots)
  try:
    app = create_app(run, engine, limits, api_key, embedding_pooling=_POOLING.value)
    server = Server(app, _HOST.value, _PORT.value, max_connections=_MAX_CONN.value, max_per_client=_MAX_PER_CLIENT.value,
                    header_timeout_s=limits.header_timeout_s, write_timeout_s=limits.read_timeout_s,
                    grace_s=_GRACE.value)
  except OSError as e:
    raise UserError(f"cannot listen on {_HOST.value}:{_PORT.value} ({e.strerror}): pick another --port.") from None
  host, port = server.address
  if not api_key and not ipaddress.ip_address(host).is_loopback:
    print(f"warning: {host} is reachable from the network and no API key is set: anyone who can reach port {port}"
          " can use this server; pass --api_key or set TPU_LM_API_KEY.", file=sys.stderr, flush=True)
  print(f"serving {run.workdir} (step {run.step}) on http://{host}:{port}"
        f"  [{'encoder: /v1/embeddings only; ' if encoder else ''}context {context} tokens, max_batch"
        f" {limits.max_batch}, API key {'required' if api_key else 'none'};"
        f" schema at /docs]", flush=True)
  reports = []
  # On SIGTERM or Ctrl-C: no new sequences; those in flight finish within the grace or are cancelled,
  # while uvicorn stops accepting and waits for their answers to go out.
  if engine is None:  # an encoder's requests are one forward pass each: uvicorn waits for them
    server.serve()
    print("server stopped", flush=True)
    return
  server.serve(on_exit=lambda: reports.append(engine.close(_GRACE.value)))
  report = reports[0] if reports else engine.close(0)
  print(f"server stopped: {_listed(report.finished, 'in-flight request finished', 'in-flight requests finished')};"
        f" {_listed(report.cancelled, f'cancelled after the {_GRACE.value:g} s grace')};"
        f" {_listed(report.refused, 'waiting request refused', 'waiting requests refused')}", flush=True)


def _api_key() -> str | None:
  key = _API_KEY.value or os.environ.get("TPU_LM_API_KEY") or None
  if key is not None and not (key.isascii() and key.isprintable() and " " not in key):
    raise UserError("the API key (--api_key or TPU_LM_API_KEY) must be printable ASCII without spaces: it is sent"
                    " in a header.")
  return key


def _listed(ids: list[str], one: str, many: str | None = None) -> str:
  shown = f" ({', '.join(ids[:8])}{', ...' if len(ids) > 8 else ''})" if ids else ""
  return f"{len(ids)} {one if len(ids) == 1 or many is None else many}{shown}"
