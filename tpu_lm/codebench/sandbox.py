"""Runs a candidate program and its doctests in a subprocess with limits: a guard against
accidents, not a security boundary.

Each run is `python -I -S -B runner.py` (no environment variables, user or site packages,
bytecode files) in a fresh temporary directory that is deleted afterwards, with a scrubbed
environment, a wall-clock timeout (the process group is killed) and, set by the child on
itself before the program runs, limits on address space, CPU seconds, file size, core
files (none) and new processes (none). An audit hook (`sys.addaudithook`) refuses every
socket event, starting programs, and writes outside the temporary directory.

What this does not stop: code that means harm. Audit hooks are documented as unsuitable
for sandboxing (ctypes, or an already-open file descriptor, gets past them); reads of
the file system are allowed; nothing isolates the kernel, users or the network
namespace. Run untrusted models' code in a container or VM.

The limits are set in the child rather than in a `preexec_fn`: the parent is a JAX
process with many threads, where preexec_fn can deadlock the forked child.
"""

import concurrent.futures
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runner.py")
_RESULT_MARK = "@@codebench-result@@ "  # runner.RESULT_MARK (that module is a script, not imported)


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 10.0  # wall clock, start-up included
  memory_mb: int = 512  # address space (RLIMIT_AS)
  file_mb: int = 16  # the largest file the program may write


@dataclasses.dataclass(frozen=True)
class Outcome:
  status: str  # "passed", "failed" (an example's output differs or it raised), "timeout", "error"
  reason: str = ""


def run(program: str, test: str, name: str = "candidate", limits: Limits = Limits(), root: str | None = None) -> Outcome:
  """Executes `program`, then `test`'s doctest examples in its namespace."""
  job = {"program": program, "test": test, "name": name,
         "limits": {"memory_mb": limits.memory_mb, "file_mb": limits.file_mb, "cpu_s": int(limits.timeout_s) + 1}}
  with tempfile.TemporaryDirectory(prefix="codebench_", dir=root, ignore_cleanup_errors=True) as outer:
    tmp = os.path.join(outer, "work")  # the program's directory; its output files sit beside it, out of its reach
    os.mkdir(tmp)
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
    # Its output goes to files, not pipes: a program that prints without end fills a file
    # up to its size limit (then its writes fail), never this process's memory.
    out_path, err_path = os.path.join(outer, "stdout"), os.path.join(outer, "stderr")
    with open(out_path, "wb") as out_file, open(err_path, "wb") as err_file:
      process = subprocess.Popen([sys.executable, "-I", "-S", "-B", _RUNNER], cwd=tmp, env=env,
                                 stdin=subprocess.PIPE, stdout=out_file, stderr=err_file, start_new_session=True)
    try:
      process.communicate(json.dumps(job).encode(), timeout=limits.timeout_s)
    except subprocess.TimeoutExpired:
      return Outcome("timeout", f"still running after {limits.timeout_s:g} s")
    finally:
      _kill(process)  # on a timeout, it; always, whatever it left in its group
    out, err = _tail(out_path), _tail(err_path)
  return _read(out, err, process.returncode, limits)


def _tail(path: str, most: int = 1 << 16) -> str:
  """The end of an output file (the result line is the last one written)."""
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - most))
    return f.read().decode(errors="replace")


def run_many(jobs: list[tuple[str, str, str]], limits: Limits = Limits(), workers: int = 4,
             on_done=None) -> list[Outcome]:
  """`run` over (program, test, name) jobs, `workers` subprocesses at a time (threads wait
  on them); `on_done(index, outcome)` as each ends."""

  def one(i):
    outcome = run(*jobs[i], limits=limits)
    if on_done:
      on_done(i, outcome)
    return outcome

  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    return list(pool.map(one, range(len(jobs))))


def _kill(process) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  process.wait()


def _read(out: str, err: str, code: int, limits: Limits) -> Outcome:
  results = [line[len(_RESULT_MARK):] for line in out.splitlines() if line.startswith(_RESULT_MARK)]
  if results:
    result = json.loads(results[-1])
    return Outcome(result["status"], result["reason"])
  if code == -signal.SIGXCPU:
    return Outcome("timeout", f"used its {int(limits.timeout_s) + 1} CPU seconds")
  if code < 0:
    return Outcome("error", f"killed by {signal.Signals(-code).name}")
  last = (err.strip().splitlines() or [""])[-1][:200]
  return Outcome("error", f"exited with code {code} without a result" + (f": {last}" if last else ""))
