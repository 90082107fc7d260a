"""tpu-lm train (python -m tpu_lm.main) --config=configs/base.py [--workdir=DIR] [--config.x=y]:
train a config in a run directory, resuming from its newest checkpoint; or, with
--compile_for=SLICE, compile its train step for a TPU slice and report whether it fits.
"""

import os

from absl import flags
from ml_collections import config_flags

from tpu_lm import cli
from tpu_lm.errors import UserError
from tpu_lm.training import preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (Python).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default ./workdirs/<config name>.")
# Multi-process runs (several hosts, or several processes on one machine):
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0; with --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes taking part in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index, 0 .. num_processes - 1.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "jax.distributed.initialize() with cluster auto-detection (Cloud TPU pods, SLURM);"
    " automatic where the environment names several processes.")
# Ahead-of-time check of a TPU slice from any machine (see aot.py):
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, "Compile the train step for this TPU slice (v5p-64, v5e-16, v6e-256, v4-128, ...),"
    " report per-chip memory, FLOPs and step time, and exit; non-zero when it does not fit.")
_COMPILE_SLICES = flags.DEFINE_integer("compile_slices", 1, "With --compile_for: how many such slices (multi-slice, DCN).")
_MFU = flags.DEFINE_float("mfu", 0.4, "With --compile_for: the MFU to turn FLOPs into a step time.")
flags.mark_flags_as_required(["config"])


def default_workdir() -> str:
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]))[0]
  return os.path.join("workdirs", name)  # e.g. ./workdirs/base


def body() -> None:
  watch = preemption.early_watch()  # made first thing by the entry point (see preemption.py)
  filename = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]  # file.py:ARG
  if not os.path.isfile(filename):
    raise UserError(cli.missing_config(filename))
  try:
    config = _CONFIG.value
  except Exception as e:  # a config file is user code: any error in it is the user's to fix
    raise UserError(f"config file {filename} failed to load ({str(e).strip().splitlines()[-1]}): fix it and"
                    " rerun.") from None
  if _COMPILE_FOR.value:
    from tpu_lm.training import aot

    aot.run(config, _COMPILE_FOR.value, _COMPILE_SLICES.value, _MFU.value)
    return
  workdir = _WORKDIR.value
  if not workdir:
    workdir = default_workdir()
    print(f"no --workdir given: using {os.path.abspath(workdir)}", flush=True)
  _init_distributed()
  from tpu_lm.training import loop  # after flag parsing: --help stays fast

  loop.train_and_evaluate(config, workdir, watch)


def _init_distributed() -> None:
  """Joins the processes of a multi-process run before anything touches a device:
  explicitly (--num_processes & co.), on request (--distributed), or when the
  environment shows several processes (a multi-host TPU slice, SLURM, Open MPI)."""
  n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
  if n < 1 or not 0 <= i < n:
    raise UserError(f"--process_id={i} with --num_processes={n}: the id must be in 0 .. {n - 1}.")
  if n > 1 and not _COORDINATOR.value:
    raise UserError(f"--num_processes={n} needs --coordinator_address=HOST:PORT (process 0's address).")
  import jax

  if n > 1:
    jax.distributed.initialize(_COORDINATOR.value, num_processes=n, process_id=i)
  elif _DISTRIBUTED.value or _cluster_detected():
    jax.distributed.initialize()


def _cluster_detected() -> bool:
  env = os.environ
  return (
      "," in env.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host Cloud TPU slice
      or int(env.get("SLURM_NTASKS", "1") or 1) > 1
      or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
  )
