"""Keeping libtpu quiet on machines without a TPU.

libtpu (installed by the `tpu` and `test` extras) probes for TPU chips when JAX
starts and, on a machine without any, prints screenfuls of warnings about the
accelerator type and worker hostnames. The commands (and the tests) call
`quiet_where_no_tpu()` before JAX starts; importing tpu_lm changes nothing.
"""

import glob
import os


def quiet_where_no_tpu() -> None:
  """Where no TPU device node exists, tell libtpu which (nominal) slice and hosts it
  would have so it stays quiet; it then finds no chip and JAX carries on with the
  GPU or CPU. Only defaults: explicit settings win, and TPU VMs (which have
  /dev/accel* or /dev/vfio/*) are left untouched."""
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Several processes may load libtpu at once (tests, --compile_for) when none of
  # them drives a TPU: skip libtpu's one-process lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
