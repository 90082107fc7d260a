"""--compile_for: the real train step of real-size configs, compiled for a real TPU
topology (described by libtpu) on this CPU machine."""

import os
import subprocess
import sys

import pytest

from configs import gpt2_124m
from tpu_lm.parallel import topology
from tpu_lm.training import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpt2_124m_compiles_and_fits_a_v5p_8():
  report = aot.compile_for(gpt2_124m.get_config(), "v5p-8")
  assert report.slice.num_chips == 4 and report.mesh_shape == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report.num_params == 124_466_688
  assert report.fits and 1 * topology.GIB < report.hbm_needed < 95 * topology.GIB
  # Params + two Adam moments, float32, replicated on every chip: 12 bytes each.
  assert report.arguments_bytes > 12 * report.num_params
  # XLA's count of the compiled step agrees with 6N + 12·L·d·T to a few percent.
  assert abs(report.program_flops_per_step / report.model_flops_per_step - 1) < 0.05
  text = "\n".join(report.lines(0.4))
  assert "fits" in text and "at 40% MFU" in text


def _main(*flags):
  return subprocess.run(
      [sys.executable, "-m", "tpu_lm.main", *flags], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "XLA_FLAGS": ""},
  )


def test_a_step_that_does_not_fit_exits_2_naming_the_shortfall():
  """llama_1b without its gradient accumulation needs 108 GiB of temporaries per v5p chip."""
  r = _main("--config=configs/llama_1b.py", "--config.optim.grad_accum_steps=1", "--compile_for=v5p-8")
  assert r.returncode == 2, r.stderr[-2000:]
  err = r.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: the train step does not fit v5p-8"), r.stderr[-2000:]
  assert "exceeds available HBM" in err[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--compile_for=v5p-12"], "error: --compile_for=v5p-12: v5p slices are v5p-N with N = 8, 16, 32, ... TensorCores."),
        (["--compile_for=v5p-8", "--config.data.global_batch_size=4"],
         "error: config field data.global_batch_size is 4: it must be divisible by the processes (1)"
         " and by the data-parallel devices (mesh data*fsdp = 4) times optim.grad_accum_steps (2)."),
    ],
    ids=["slice_name", "batch"],
)
def test_bad_compile_for_input_is_one_line(flags, message):
  r = _main("--config=configs/gpt2_124m.py", *flags)
  assert r.returncode == 2 and r.stderr.strip() == message, r.stderr[-2000:]
