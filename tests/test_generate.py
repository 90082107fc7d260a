"""The generate command in a subprocess: streaming, batches, interactive mode, bad input."""

import os
import subprocess
import sys

import jax
import pytest

from tpu_lm.inference import decode, run_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _generate(*flags, stdin=None):
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
  return subprocess.run([sys.executable, "-m", "tpu_lm.generate", *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, input=stdin)


def test_one_prompt_streams_its_completion(trained_run):
  out = _generate(f"--workdir={trained_run}", "--prompt=the model", "--temperature=0", "--max_new_tokens=9")
  assert out.returncode == 0, out.stderr[-3000:]
  local = run_dir.load(trained_run, devices=jax.devices()[:1])
  [c] = local.decoder.generate([local.encode_prompt("the model")], decode.Sampling(9, 0.0))
  assert out.stdout == "the model" + local.tokenizer.decode(c.tokens) + f"\n[{len(c.tokens)} tokens, {c.finish_reason}]\n"
  assert "loaded" in out.stderr and "step 6" in out.stderr
  text = local.tokenizer.decode(c.tokens)
  stop = text[3:5]
  out = _generate(f"--workdir={trained_run}", "--prompt=the model", "--temperature=0", "--max_new_tokens=9",
                  f"--stop={stop}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout == "the model" + text[: text.index(stop)] + f"\n[{len(c.tokens)} tokens, stop sequence]\n"


def test_stop_scanner_holds_back_what_could_start_a_stop_and_cuts_at_the_first():
  from tpu_lm.inference.stops import StopScanner, first_stop

  for pieces in (["hello wor", "ld! stop", " here"], list("hello world! stop here"), ["hello world! stop here"]):
    scanner = StopScanner(("stop", "world!"))
    out = "".join(scanner.push(p) for p in pieces) + scanner.finish()
    assert (out, scanner.stopped) == ("hello ", True)
  scanner = StopScanner(("xyz",))
  assert "".join(scanner.push(p) for p in ["ab", "cx", "y"]) == "abc"  # "xy" held: it may become "xyz"
  assert scanner.finish() == "xy" and not scanner.stopped
  assert StopScanner(()).push("anything") == "anything"
  assert first_stop("a.b.c", (".c", ".")) == 1 and first_stop("abc", ("z",)) is None


def test_several_samples_and_interactive_mode(trained_run):
  out = _generate(f"--workdir={trained_run}", "--prompt=a", "--prompt=b", "--num_samples=2", "--max_new_tokens=5",
                  "--interactive", stdin="one\n\ntwo\n")
  assert out.returncode == 0, out.stderr[-3000:]
  headers = [line.split(" (")[0] for line in out.stdout.splitlines() if line.startswith("--- sample")]
  assert headers == [f"--- sample {i}/4" for i in (1, 2, 3, 4)]
  assert out.stdout.count("[5 tokens, ") == 2  # the two interactive prompts, streamed


@pytest.mark.parametrize("flags, message", [
    (["--workdir=/nonexistent/run", "--prompt=a"], "/nonexistent/run has no checkpoints/ directory"),
    (["--prompt=a", "--top_p=0"], "top_p=0.0 is invalid: it must be a number in (0, 1]"),
    (["--prompt=a", "--max_new_tokens=500"], "exceeds the model's context of 64 tokens"),
    (["--prompt=a", "--step=999"], "there is no checkpoint at step 999"),
    (["--prompt_file=/nonexistent.txt"], "cannot read --prompt_file=/nonexistent.txt"),
    ([], "no prompt given"),
    (["--prompt=a", "--num_samples=x"], "flag --num_samples=x"),
    (["--prompt=a", "--stop="], "--stop is empty"),
], ids=["no_run", "top_p", "context", "step", "prompt_file", "no_prompt", "bad_flag", "empty_stop"])
def test_bad_input_is_one_line_and_exit_2(trained_run, flags, message):
  if not any(f.startswith("--workdir") for f in flags):
    flags = [f"--workdir={trained_run}", *flags]
  out = _generate(*flags)
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if not l.startswith("[loaded")]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
  assert "Traceback" not in out.stderr
