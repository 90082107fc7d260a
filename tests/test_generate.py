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


@pytest.mark.slow  # the command end to end, twice
def test_one_prompt_streams_its_completion(trained_run):
  out = _generate(f"--workdir={trained_run}", "--prompt=the model", "--temperature=0", "--max_new_tokens=9")
  assert out.returncode == 0, out.stderr[-3000:]
  local = run_dir.load(trained_run, devices=jax.devices()[:1])
  [c] = local.decoder.generate([local.encode_prompt("the model")], decode.Sampling(9, 0.0))
  assert out.stdout == "the model" + local.tokenizer.decode(c.tokens) + f"\n[{len(c.tokens)} tokens, {c.finish_reason}]\n"
  assert "loaded" in out.stderr and "step 6" in out.stderr
  text = local.tokenizer.decode(c.tokens)
  stop = text[3:5]
  # Decoding stops at the token that completes the stop sequence (byte tokenizer: a token a byte).
  decoded = len(text[: text.index(stop) + len(stop)].encode())
  assert decoded < len(c.tokens)
  out = _generate(f"--workdir={trained_run}", "--prompt=the model", "--temperature=0", "--max_new_tokens=9",
                  f"--stop={stop}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout == "the model" + text[: text.index(stop)] + f"\n[{decoded} tokens, stop sequence]\n"
  out = _generate(f"--workdir={trained_run}", "--prompt=the model", "--num_samples=2", "--temperature=0",
                  "--max_new_tokens=9", f"--stop={stop}")  # a batch: each row stops at its own stop sequence
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout == "".join(f"--- sample {i + 1}/2 (seed {i}; {decoded} tokens, stop sequence) ---\n"
                               f"the model{text[: text.index(stop)]}\n" for i in range(2))


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


@pytest.mark.slow  # the command end to end
def test_several_samples_and_interactive_mode(trained_run):
  out = _generate(f"--workdir={trained_run}", "--prompt=a", "--prompt=b", "--num_samples=2", "--max_new_tokens=5",
                  "--interactive", stdin="one\n\ntwo\n")
  assert out.returncode == 0, out.stderr[-3000:]
  headers = [line.split(" (")[0] for line in out.stdout.splitlines() if line.startswith("--- sample")]
  assert headers == [f"--- sample {i}/4" for i in (1, 2, 3, 4)]
  assert out.stdout.count("[5 tokens, ") == 2  # the two interactive prompts, streamed


# Runs the command with Ctrl-C pressed (SIGINT to the process) at the third step of the
# decode calls listed in $INTERRUPT_CALLS (1: the first), while the compiled loop runs.
_CTRL_C = """
import os, signal, sys, threading
from tpu_lm import cli
from tpu_lm.inference import decode

calls, real = [], decode.Decoder.generate
interrupted = [int(c) for c in os.environ["INTERRUPT_CALLS"].split(",")]

def generate(self, prompts, sampling, on_step=None):
  calls.append(1)
  press = len(calls) in interrupted
  def step(i, tokens, done):
    if press and i == 2:
      # To this thread, so the signal is delivered before pthread_kill returns: sent to
      # the process, the kernel may hand it to a thread a busy machine runs only later.
      signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    return on_step(i, tokens, done)
  return real(self, prompts, sampling, on_step=step if on_step else None)

decode.Decoder.generate = generate
cli.start("generate")
"""


def _generate_with_ctrl_c(calls: str, *flags, stdin=None):
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1", "INTERRUPT_CALLS": calls}
  return subprocess.run([sys.executable, "-c", _CTRL_C, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, input=stdin)


@pytest.mark.slow  # a real process and a real SIGINT
def test_ctrl_c_stops_decoding_at_the_next_step_prints_what_came_and_exits_130(trained_run):
  local = run_dir.load(trained_run, devices=jax.devices()[:1])
  [c] = local.decoder.generate([local.encode_prompt("the model")], decode.Sampling(40, 0.0))
  full = local.tokenizer.decode(c.tokens)
  assert len(c.tokens) == 40  # uninterrupted, it runs to its limit
  out = _generate_with_ctrl_c("1", f"--workdir={trained_run}", "--prompt=the model", "--temperature=0",
                              "--max_new_tokens=40")
  assert out.returncode == 130, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr, out.stderr
  assert out.stdout.startswith("the model") and out.stdout.endswith("\n[interrupted]\n"), out.stdout
  text = out.stdout[len("the model"): -len("\n[interrupted]\n")]
  assert full.startswith(text) and len(text.encode()) < 10  # stopped a step or so after the third


@pytest.mark.slow  # a real process and a real SIGINT
def test_ctrl_c_in_interactive_mode_stops_the_completion_and_returns_to_the_prompt(trained_run):
  # Ctrl-C during the batch of --prompt samples, then during the first typed prompt; the second runs whole.
  out = _generate_with_ctrl_c("1,2", f"--workdir={trained_run}", "--prompt=a", "--num_samples=2", "--temperature=0",
                              "--max_new_tokens=40", "--interactive", stdin="the model\nthe model\n")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr
  assert out.stdout.count("tokens, interrupted) ---") == 2 and out.stdout.count("[interrupted]\n") == 2
  assert out.stdout.count("[40 tokens, length]") == 1


@pytest.mark.parametrize("flags, message", [
    (["--workdir=/nonexistent/run", "--prompt=a"], "/nonexistent/run has no checkpoints/ directory"),
    (["--prompt=a", "--top_p=0"], "top_p=0.0 is invalid: it must be a number in (0, 1]"),
    (["--prompt=a", "--max_new_tokens=500"], "exceeds the model's context of 64 tokens"),
    (["--prompt=a", "--step=999"], "there is no checkpoint at step 999"),
    (["--prompt_file=/nonexistent.txt"], "cannot read --prompt_file=/nonexistent.txt"),
    ([], "no prompt given"),
    (["--prompt=a", "--num_samples=x"], "flag --num_samples=x"),
    (["--prompt=a", "--stop="], "--stop is empty"),
    (["--prompt=a", f"--top_k={2**31}"], "top_k=2147483648 is invalid: it must be an integer from 0 to the vocabulary"
                                         " size, 259"),
    (["--prompt=a", "--temperature=1e300"], "temperature=1e+300 is invalid: it must be a number from 0 to 100"),
    (["--prompt=a", "--num_samples=100000"], "is more than the 1024 sequences decoded in one batch"),
    (["--prompt=a", "--tensor_parallel=0"], "--tensor_parallel=0 is invalid: it must be at least 1"),
    pytest.param(["--prompt=a", "--suffix=b"], "was not trained to fill in the middle (task.kind='lm'), so it cannot"
                 " use --suffix", marks=pytest.mark.slow),  # the run is loaded first
], ids=["no_run", "top_p", "context", "step", "prompt_file", "no_prompt", "bad_flag", "empty_stop", "top_k",
        "temperature", "batch", "tensor_parallel", "suffix_not_fim"])
def test_bad_input_is_one_line_and_exit_2(trained_run, flags, message):
  if not any(f.startswith("--workdir") for f in flags):
    flags = [f"--workdir={trained_run}", *flags]
  out = _generate(*flags)
  assert out.returncode == 2, out.stderr[-3000:]
  lines = [l for l in out.stderr.splitlines() if not l.startswith("[loaded")]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
  assert "Traceback" not in out.stderr


@pytest.mark.slow  # the command end to end, with and without a draft
def test_a_draft_model_speeds_up_but_does_not_change_greedy_text(trained_run):
  flags = (f"--workdir={trained_run}", "--prompt=the model", "--prompt=a", "--temperature=0", "--max_new_tokens=20")
  plain = _generate(*flags)
  # The run is its own draft here: every proposal is accepted.
  out = _generate(*flags, f"--draft_workdir={trained_run}", "--draft_tokens=3")
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout == plain.stdout
  assert "draft tokens accepted (100%)]" in out.stderr, out.stderr
  out = _generate(*flags, f"--draft_workdir={trained_run}", "--draft_tokens=0")
  assert out.returncode == 2 and "error: --draft_tokens=0 is invalid: give an integer from 1 to 16" in out.stderr
