"""The CPU speed factor (tpu-lm speed): the fixed workload, the factor's arithmetic, the
command's output and its one-line errors. No timing is asserted: the factor is what is
measured."""

import json
import math
import subprocess
import sys

import jax
import pytest
import numpy as np

from tpu_lm import speed_factor


def test_the_workload_is_the_fixed_reference_step():
  assert (speed_factor.L, speed_factor.D, speed_factor.V, speed_factor.T, speed_factor.B, speed_factor.H) == (
      2, 160, 2048, 256, 32, 2)
  assert speed_factor.REFERENCE_MS == 410.0 and speed_factor.WARMUP == 4
  params = speed_factor.init(jax.random.PRNGKey(0))
  # Embeddings 2048x160 + positions 256x160 + final norm, two blocks of 2 norms, qkv, proj and a 4x MLP.
  assert sum(x.size for x in jax.tree.leaves(params)) == 983_840


def test_measure_reports_the_factor_of_its_own_step():
  m = speed_factor.measure(repeats=1, warmup=1)
  assert set(m) == {"step_ms", "speed_factor", "base_budget_s", "repeats", "loss"}
  assert m["repeats"] == 1 and m["step_ms"] > 0
  assert math.isclose(m["speed_factor"], speed_factor.REFERENCE_MS / m["step_ms"], abs_tol=1e-3)  # both rounded
  budget_s = speed_factor.BASE_BUDGET_S * m["step_ms"] / speed_factor.REFERENCE_MS
  assert math.isclose(m["base_budget_s"], budget_s, abs_tol=1)
  assert abs(m["loss"] - np.log(speed_factor.V)) < 0.1  # random tokens: the loss stays near ln V
  assert f"speed factor {m['speed_factor']:.2f}" in speed_factor.line(m)


def _speed(*flags):
  return subprocess.run([sys.executable, "-m", "tpu_lm.speed", *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.slow  # a real process timing real steps
def test_command_prints_the_json_line():
  out = _speed("--repeats=1", "--json")
  assert out.returncode == 0, out.stderr
  m = json.loads(out.stdout.strip())
  assert m["repeats"] == 1 and math.isclose(m["speed_factor"], 410.0 / m["step_ms"], abs_tol=1e-3)


def test_bad_flags_are_one_line_errors():
  for flags, says in ((["--repeats=0"], "--repeats=0 is invalid: it must be positive."),
                      (["--repeats=two"], "--repeats"), (["--bogus"], "bogus")):
    out = _speed(*flags)
    assert out.returncode == 2, (flags, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and says in out.stderr, out.stderr
