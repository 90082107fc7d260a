"""The offline code benchmark: tpu-lm codebench (python -m tpu_lm.codebench) --workdir=RUN
[--samples=5 --k=1,5 --temperature=0.8 --max_new_tokens=128 --limit=M --max_batch=8 --seed=0]

Completes standard-library functions from their signature and docstring (the problem set
shipped in tpu_lm/codebench/problems.jsonl), runs each completion's doctests in a guarded
subprocess (tpu_lm/codebench/sandbox.py: a guard against accidents, not a security
boundary), and reports pass@k (Chen et al. 2021's unbiased estimator). Writes
RUN/codebench/results.json, results.md and samples.jsonl (each completion and its
outcome), and prints the table. Problems too long for the model's context are skipped
and counted apart.

Rebuild the problem set from the running Python's standard library (the first form
above reads it):
  python -m tpu_lm.codebench --build_problems=PATH [--exclude_corpus=DIR ...]
"""

from absl import flags

from tpu_lm import cli
from tpu_lm.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", "", "The run to benchmark.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
_SAMPLES = flags.DEFINE_integer("samples", 5, "Completions per problem (n of pass@k).")
_K = flags.DEFINE_list("k", ["1", "5"], "The k of pass@k, each at most --samples.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling (1: off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "The longest body, in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sample j of every problem is drawn with seed + j.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Only the first this many problems (0: all).")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 8, "Completions decoded together.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Sandbox processes at a time.")
_TIMEOUT = flags.DEFINE_float("timeout", 10.0, "Seconds each program may run (wall clock).")
_MEMORY = flags.DEFINE_integer("memory_mb", 512, "Address space each program may use, in MiB.")
_PROBLEMS = flags.DEFINE_string("problems", "", "A problem file (default: the shipped set).")
_OUT = flags.DEFINE_string("out", "", "Write the results here (default: RUN/codebench).")
_BUILD = flags.DEFINE_string("build_problems", "", "Rebuild the problem set from this Python's standard library into"
                             " this JSONL file, and exit.")
_EXCLUDE = flags.DEFINE_multi_string("exclude_corpus", [], "With --build_problems: drop the functions whose source"
                                     " appears in this directory's files (a training corpus); repeatable.")
for _flag in (_SAMPLES, _MAX_NEW, _MAX_BATCH, _WORKERS, _TIMEOUT, _MEMORY):
  cli.positive(_flag)
cli.check_flag(_LIMIT, lambda v: v >= 0, "give the number of problems to run (0: all)")
cli.check_flag(_STEP, lambda v: v >= 0, "give a checkpoint step (0 or more), or leave it out")

USAGE = "pass --workdir=RUN (or --build_problems=PATH)."


def body() -> None:
  import os

  from tpu_lm import storage
  from tpu_lm.codebench import problems as problems_lib

  if _BUILD.value:
    _build(problems_lib)
    return
  if not _WORKDIR.value:
    raise UserError("no run given: pass --workdir=RUN (or --build_problems=PATH to rebuild the problem set).")
  settings = _settings()
  path = _PROBLEMS.value or problems_lib.FILE
  problems = problems_lib.read(path)
  if not problems:
    raise UserError(f"the problem file {path} holds no problem: pass another --problems or rebuild it.")
  from tpu_lm.codebench import bench
  from tpu_lm.inference import run_dir

  run = run_dir.load(_WORKDIR.value, step=_STEP.value)
  out = _OUT.value or os.path.join(run.workdir, "codebench")
  storage.check_writable(out, "--out")  # before the generation and the sandbox, not after
  print(f"code benchmark on {run.workdir} at step {run.step}: problem set {problems_lib.version(path)}", flush=True)
  results, samples = bench.evaluate(run, problems, settings, problems_lib.version(path),
                                    on_progress=lambda line: print(line, flush=True))
  written = bench.write(results, samples, out)
  print("\n".join(bench.table(results)))
  seen = results["seen_in_training"]
  if seen["evaluated"]:
    print(f"note: {seen['evaluated']} of the evaluated problems are in the run's training data"
          f" ({'; '.join(seen['checked'])}): their numbers measure recall, not synthesis.")
  print(f"wrote {', '.join(written)}")


def _settings():
  from tpu_lm.codebench import bench, sandbox
  from tpu_lm.inference.sampling import Sampling

  try:
    ks = tuple(sorted({int(k) for k in _K.value}))
  except ValueError:
    raise UserError(f"--k={','.join(_K.value)}: give whole numbers, e.g. --k=1,5.") from None
  if not ks or ks[0] < 1 or ks[-1] > _SAMPLES.value:
    raise UserError(f"--k={','.join(_K.value)} needs each k from 1 to --samples={_SAMPLES.value}: pass k at most"
                    " the samples drawn per problem, or draw more --samples.")
  Sampling(_MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value, _SEED.value).check()
  limits = sandbox.Limits(timeout_s=_TIMEOUT.value, memory_mb=_MEMORY.value)
  return bench.Settings(samples=_SAMPLES.value, ks=ks, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                        top_p=_TOP_P.value, max_new_tokens=_MAX_NEW.value, seed=_SEED.value, limit=_LIMIT.value,
                        max_batch=_MAX_BATCH.value, workers=_WORKERS.value, limits=limits)


def _build(problems_lib) -> None:
  import os
  import platform

  out = os.path.abspath(_BUILD.value)
  if not os.path.isdir(os.path.dirname(out)):
    raise UserError(f"--build_problems={_BUILD.value}: its folder does not exist; create it or pass another path.")
  built, dropped = problems_lib.build(tuple(_EXCLUDE.value), workers=_WORKERS.value)
  problems_lib.write(built, out)
  print(f"wrote {len(built)} problems from Python {platform.python_version()}'s standard library to {out}"
        f" ({problems_lib.version(out)}): of {dropped['candidates']} candidates, {dropped['in_corpus']} appear in"
        f" --exclude_corpus and {dropped['failed_verification']} failed verification in the sandbox.")
