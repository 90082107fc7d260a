"""tpu_lm: a JAX research codebase for Transformer language models."""

import glob as _glob
import os as _os

# libtpu (installed by the `tpu` and `test` extras) probes for TPU chips when JAX
# starts and, on a machine without any, prints screenfuls of warnings about the
# accelerator type and worker hostnames. Where no TPU device node exists, tell it
# which (nominal) slice and hosts it would have so it stays quiet; it then finds no
# chip and JAX carries on with the GPU or CPU. Only defaults: explicit settings win,
# and TPU VMs (which have /dev/accel* or /dev/vfio/*) are left untouched.
if not (_glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*")):
  _os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  _os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Several tpu_lm processes may load libtpu at once (tests, --compile_for) when
  # none of them drives a TPU: skip libtpu's one-process lock file.
  _os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
