"""The server under load, on loopback: requests/s, time to first token, inter-token
latency, with and without misbehaving clients, and the server's memory over the run.

A run directory of random weights is written first (GPT-2 124M's transformer with
the byte tokenizer, float32; speed does not depend on the weights' values), then
`python -m tpu_lm.serve` is started on it and driven in two phases of the same work:

  clean:  --clients streaming clients, each sending --requests requests one after
          another (prompts of 8-64 bytes, max_tokens 16-64, temperature 0.8, seeds
          fixed: every run sends the same requests);
  mixed:  the same, while misbehaving clients run beside them: slow readers (a 4 KB
          receive buffer, reading 64 bytes every 0.5 s), half-open clients (half a
          body, then silence) and clients that leave mid-stream.

For the well-behaved clients: requests/s and generated tokens/s over the phase,
time to first token (TTFT: request sent -> first token event) and inter-token latency
(ITL: gaps between token events) at p50/p99. Memory: the server's resident set
sampled every 0.2 s, over --rounds=2 rounds of both phases (the second shows whether it
still grows). With --baseline=TREE the same two phases run against the server
of another checkout (e.g. `git worktree add /tmp/before 6ffad3c`: the engine that
decoded one batch at a time), in the same run.

With --locust_s=N, locust (a standard load tool, locustfile.py) then sends whole
completions for N seconds to each server: a second opinion.

usage: python experiments/serve_load/run.py [--clients 12] [--requests 3] [--baseline TREE] [--locust_s 60]
Prints the table and puts it on top of results.md beside this script.
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.serve_load.run`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.serve_load.run", *sys.argv[1:]])

import argparse
import csv
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
from experiments import plots, record  # noqa: E402
from tpu_lm.parallel import libtpu_env  # noqa: E402

libtpu_env.quiet_where_no_tpu()  # before JAX starts its backends (write_run uses it)


def write_run(workdir: str) -> None:
  """GPT-2 124M's shape, random weights, the byte tokenizer."""
  import jax
  import flax.linen as nn

  from configs import gpt2_124m
  from tpu_lm.config import derived
  from tpu_lm.data.tokenizer import ByteTokenizer
  from tpu_lm.inference import run_dir
  from tpu_lm.model import params as params_lib
  from tpu_lm.model import transformer

  config = gpt2_124m.get_config()
  config.data.tokenizer = "bytes"
  config.model.update(dtype="float32", scan_layers=False, remat="none")
  params = nn.unbox(params_lib.init_params(transformer.Transformer(derived.model_config(config)),
                                           jax.random.key(0), 8))
  params = jax.tree.map(np.array, params)
  # The (tied) embedding rows of printable ASCII scaled up, the rest zeroed: random
  # weights then draw text, not bytes that are no text alone (a stream holds those
  # back, and its events would no longer be tokens), nor end-of-sequence (every
  # request runs to its max_tokens).
  table = params["embed"]["embedding"]
  ascii_ids = ByteTokenizer.OFFSET + np.arange(32, 127)
  scaled = table[ascii_ids] * 10
  table[:] = 0
  table[ascii_ids] = scaled
  run_dir.write(workdir, config, params, ByteTokenizer())


def start_server(tree: str, workdir: str, max_batch: int, extra=()):
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": tree}
  proc = subprocess.Popen(
      [sys.executable, "-m", "tpu_lm.serve", f"--workdir={workdir}", "--port=0", f"--max_batch={max_batch}",
       "--max_new_tokens=64", "--max_queue=256", "--max_connections=64", "--read_timeout_s=5",
       "--max_connections_per_client=0", *extra],  # every client is 127.0.0.1 here
      cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  line = proc.stdout.readline()
  while line.startswith("warmup"):
    line = proc.stdout.readline()
  match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
  if not match:
    proc.kill()
    raise SystemExit(f"the server in {tree} did not start: {line}")
  return proc, int(match.group(1))


def rss_mib(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024


def stream(port: int, body: dict, recv_buffer: int = 0, read_pause_s: float = 0.0, leave_after: int = 0):
  """One streaming request: (send time, [time of each token event]) or None if it left."""
  sock = socket.socket()
  if recv_buffer:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
  sock.settimeout(300)
  sock.connect(("127.0.0.1", port))
  data = json.dumps({**body, "stream": True}).encode()
  sent = time.perf_counter()
  # Connection: close, so that the stream's end is the connection's with either server
  # (HTTP/1.1 keeps a connection open otherwise); events may come in chunked framing.
  sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
  times, buffer = [], b""
  while True:
    chunk = sock.recv(64 if read_pause_s else 65536)
    if not chunk:
      break
    now = time.perf_counter()
    buffer += chunk
    while b"\n\n" in buffer:
      event, buffer = buffer.split(b"\n\n", 1)
      if b"data: {" in event and b'"text"' in event:
        times.append(now)
    if leave_after and len(times) >= leave_after:
      sock.close()
      return None
    if read_pause_s:
      time.sleep(read_pause_s)
  sock.close()
  return sent, times


def half_open(port: int, hold_s: float) -> None:
  sock = socket.create_connection(("127.0.0.1", port), timeout=60)
  sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n{\"prompt\": ")
  deadline = time.time() + hold_s
  try:
    while time.time() < deadline and sock.recv(4096):
      pass
  except OSError:
    pass
  sock.close()


def requests_for(client: int, n: int) -> list[dict]:
  rng = random.Random(client)
  words = "the model returns a list of values for each key in the table while".split()
  return [{"prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))[:64],
           "max_tokens": rng.randint(16, 64), "temperature": 0.8, "seed": 1000 * client + i} for i in range(n)]


def phase(port: int, pid: int, clients: int, requests: int, mixed: bool) -> dict:
  results, rss, stop = [], [], threading.Event()

  def sample():
    while not stop.is_set():
      rss.append(rss_mib(pid))
      time.sleep(0.2)

  def client(c):
    for body in requests_for(c, requests):
      results.append(stream(port, body))

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  bad = []
  if mixed:
    for i in range(3):
      bad.append(threading.Thread(target=stream, daemon=True, kwargs=dict(
          port=port, body={"prompt": "slow reader", "max_tokens": 64, "seed": i}, recv_buffer=4096,
          read_pause_s=0.5)))
      bad.append(threading.Thread(target=half_open, args=(port, 30), daemon=True))
      bad.append(threading.Thread(target=stream, daemon=True, kwargs=dict(
          port=port, body={"prompt": "leaves early", "max_tokens": 64, "seed": i}, leave_after=3)))
    for t in bad:
      t.start()
  start = time.perf_counter()
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - start
  stop.set()
  sampler.join()
  done = [r for r in results if r]
  ttft = [times[0] - sent for sent, times in done]
  itl = [b - a for _, times in done for a, b in zip(times, times[1:])]
  tokens = sum(len(times) for _, times in done)
  return {"requests": len(done), "seconds": elapsed, "req_s": len(done) / elapsed, "tok_s": tokens / elapsed,
          "ttft": np.percentile(ttft, [50, 99]) * 1000, "itl": np.percentile(itl, [50, 99]) * 1000,
          "rss": (rss[0], max(rss), rss[-1])}


def locust(port: int, args) -> dict:
  """locust's numbers for whole completions (locustfile.py) over --locust_s seconds."""
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "locust"), "-f", os.path.join(HERE, "locustfile.py"),
                    "--headless", "-u", str(args.clients), "-r", str(args.clients), "-t", f"{args.locust_s}s",
                    "--host", f"http://127.0.0.1:{port}", "--csv", os.path.join(tmp, "out"), "--only-summary"],
                   check=True, capture_output=True, timeout=args.locust_s + 120)
    with open(os.path.join(tmp, "out_stats.csv")) as f:
      rows = list(csv.DictReader(f))
  row = next(r for r in rows if r["Name"] == "Aggregated")
  return {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
          "req_s": float(row["Requests/s"]), "p50": float(row["50%"]), "p99": float(row["99%"])}


def measure(tree: str, workdir: str, args, extra=()) -> dict:
  proc, port = start_server(tree, workdir, args.max_batch, extra)
  try:
    # An untimed pass of the same load first: every batch and prompt shape it meets is
    # compiled once (the first request of a new shape pays a compile, ~1-3 s here).
    phase(port, proc.pid, args.clients, args.requests, mixed=True)
    # Twice over: the second round shows whether memory keeps growing or has levelled off.
    out = {f"{name} {r}": phase(port, proc.pid, args.clients, args.requests, name == "mixed")
           for r in range(1, args.rounds + 1) for name in ("clean", "mixed")}
    if args.locust_s:
      out["locust"] = locust(port, args)
  finally:
    proc.terminate()
    proc.wait(60)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--clients", type=int, default=12)
  ap.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
  ap.add_argument("--max_batch", type=int, default=16)
  ap.add_argument("--rounds", type=int, default=2, help="times the clean + mixed phases run")
  ap.add_argument("--baseline", help="another checkout of tpu_lm to measure the same way")
  ap.add_argument("--locust_s", type=int, default=0, help="then locust's users for this long (pip install locust)")
  args = ap.parse_args()
  factor = record.speed_factor()
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, "run")
    write_run(workdir)
    measured = [("this tree", measure(ROOT, workdir, args, ["--warmup"]))]
    if args.baseline:  # (it has no --warmup: the untimed pass compiles what it meets)
      measured.append(("baseline", measure(os.path.abspath(args.baseline), workdir, args)))
  rows = ["| server | phase | requests | req/s | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |"
          " server RSS start / max / end MiB |", "|---|---|---|---|---|---|---|---|"]
  for name, m in measured:
    for ph, r in m.items():
      if ph == "locust":
        continue
      rows.append(f"| {name} | {ph} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.0f} |"
                  f" {r['ttft'][0]:.0f} / {r['ttft'][1]:.0f} | {r['itl'][0]:.0f} / {r['itl'][1]:.0f} |"
                  f" {r['rss'][0]:.0f} / {r['rss'][1]:.0f} / {r['rss'][2]:.0f} |")
  if args.locust_s:
    rows += ["", f"locust ({args.clients} users sending whole completions, {args.locust_s} s):", "",
             "| server | requests | failures | req/s | latency p50 / p99 ms |", "|---|---|---|---|---|"]
    rows += [f"| {name} | {m['locust']['requests']} | {m['locust']['failures']} | {m['locust']['req_s']:.2f} |"
             f" {m['locust']['p50']:.0f} / {m['locust']['p99']:.0f} |" for name, m in measured]
  about = (f"GPT-2 124M (random weights, byte tokenizer), {args.clients} streaming clients x {args.requests}"
           f" requests, --max_batch={args.max_batch}, {args.rounds} rounds")
  record.publish(os.path.join(HERE, "results.md"), "The server under load (experiments/serve_load/run.py)", [
      *rows, "", "mixed: + 3 slow readers, 3 half-open clients, 3 clients leaving mid-stream."], factor, about)

if __name__ == "__main__":
  main()
  plots.serve_load()  # the picture next to the table, from the entry just written
