"""The sandbox's child (run as a script by sandbox.py, never imported): reads a job
{"program", "test", "name", "limits"} as JSON on stdin, lowers its own resource limits,
installs the audit hook, executes the program and runs the doctests against it, and
prints the outcome as the last line of stdout after RESULT_MARK.

Standard library only: it runs as `python -I -S -B`, without site-packages.
"""

import doctest
import io
import json
import os
import resource
import sys

RESULT_MARK = "@@codebench-result@@ "

# Audit events refused outright: the network, and starting programs (a program could reach
# the network, or outlive the timeout).
REFUSED_PREFIXES = ("socket.", "os.exec", "os.spawn", "os.posix_spawn")
REFUSED = {"subprocess.Popen", "os.system", "os.fork", "os.forkpty", "pty.spawn", "webbrowser.open"}
# Events that change the file system, refused outside the working directory (a temporary one).
WRITES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.truncate", "os.chmod", "os.chown", "os.link",
          "os.symlink", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copytree"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def limit(limits: dict) -> None:
  """Soft and hard limits alike, so the program cannot raise them again."""
  cpu = int(limits["cpu_s"])
  for name, value in ((resource.RLIMIT_AS, limits["memory_mb"] << 20), (resource.RLIMIT_CPU, cpu),
                      (resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, limits["file_mb"] << 20),
                      (resource.RLIMIT_NPROC, 0)):
    try:
      resource.setrlimit(name, (value, value))
    except (ValueError, OSError):  # a hard limit already lower, or a limit this kernel lacks
      pass


def guard(home: str):
  """The audit hook: refuses the network, new processes, and writes outside `home`."""

  def outside(path) -> bool:
    if isinstance(path, int):
      return False  # an open file descriptor: its opening was checked
    path = os.fsdecode(path)
    return not os.path.realpath(path).startswith(home + os.sep)

  def hook(event: str, args) -> None:
    if event in REFUSED or event.startswith(REFUSED_PREFIXES):
      raise PermissionError(f"the code benchmark's sandbox refuses {event}")
    if event == "open" and len(args) >= 3:
      path, mode, flags = args[0], args[1], args[2]
      writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
      if writes and outside(path):
        raise PermissionError(f"the code benchmark's sandbox refuses writing {path} (outside its directory)")
    elif event in WRITES and any(outside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
      raise PermissionError(f"the code benchmark's sandbox refuses {event} outside its directory")

  return hook


class _Runner(doctest.DocTestRunner):
  """Keeps the first failing example, for a short reason."""

  first = ""

  def report_failure(self, out, test, example, got):
    if not self.first:
      self.first = f"{example.source.strip()} gave {got.strip() or 'nothing'!r}, expected {example.want.strip()!r}"

  def report_unexpected_exception(self, out, test, example, exc_info):
    if not self.first:
      self.first = f"{example.source.strip()} raised {exc_info[0].__name__}: {str(exc_info[1])[:100]}"


def outcome(job: dict) -> dict:
  globs = {"__name__": "__codebench__", "__builtins__": __builtins__}
  try:
    exec(compile(job["program"], "<candidate>", "exec"), globs)
  except BaseException as e:  # the program itself fails: SyntaxError, an import, SystemExit, MemoryError
    return {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:150]}"}
  test = doctest.DocTestParser().get_doctest(job["test"], globs, job["name"], "<candidate>", 0)
  runner = _Runner(verbose=False, optionflags=0)
  runner.run(test, out=lambda _: None, clear_globs=False)
  if not runner.tries:
    return {"status": "error", "reason": "the test holds no doctest example"}
  if runner.failures:
    return {"status": "failed", "reason": f"{runner.failures} of {runner.tries} examples failed; first: {runner.first}"}
  return {"status": "passed", "reason": f"{runner.tries} examples"}


def main() -> None:
  job = json.loads(sys.stdin.read())
  real_stdout = os.dup(1)
  limit(job["limits"])
  sys.addaudithook(guard(os.path.realpath(os.getcwd())))
  sys.stdout = io.StringIO()  # what the program prints at the top level goes nowhere
  result = outcome(job)
  line = RESULT_MARK + json.dumps({**result, "reason": result["reason"][:300]}) + "\n"
  os.write(real_stdout, line.encode())


if __name__ == "__main__":
  main()
