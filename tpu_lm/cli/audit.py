"""A memorization audit with canaries: python -m tpu_lm.audit ...

  # 1. insert canaries (each repeated 1, 4, 16 and 64 times) into a text_files data directory
  python -m tpu_lm.audit --insert_into=DATA_DIR --repeats=1,4,16,64 [--data_path='DATA_DIR/*.txt']
  # 2. train or fine-tune on it (--config.data.dataset=text_files --config.data.path=DATA_DIR), then
  python -m tpu_lm.audit --workdir=RUN --canaries=DATA_DIR_canaries.json

Insertion checks, with the data pipeline's own functions, that a run on --data_path
(what it will pass as data.path) trains on every copy, or refuses and writes nothing;
the audit checks the same of the run's saved config, or refuses to report.

Prints each canary's exposure in bits (Carlini et al. 2019; tpu_lm/privacy/audit.py):
how much more likely the model finds the secret than random ones of its format.
"""

import json
import os

from absl import flags

from tpu_lm.errors import UserError

_INSERT = flags.DEFINE_string("insert_into", "", "Write canary files into this data directory (their list goes beside it).")
_REPEATS = flags.DEFINE_list("repeats", ["1", "4", "16", "64"], "With --insert_into: copies of each canary.")
_SEED = flags.DEFINE_integer("seed", 0, "With --insert_into: the secrets' seed.")
_DATA_PATH = flags.DEFINE_string("data_path", "", "With --insert_into: the data.path the run will read, a directory"
                                 " or glob (default: the --insert_into directory).")
_SUFFIX = flags.DEFINE_string("suffix", "", "With --insert_into: the canary files' suffix (default: the one"
                              " --data_path's glob names, as .txt for '*.txt', else .py).")
_MAX_DOCUMENTS = flags.DEFINE_integer("max_documents", 0, "With --insert_into: the data.max_documents the run will"
                                      " use (0: all).")
_WORKDIR = flags.DEFINE_string("workdir", "", "The run to audit.")
_CANARIES = flags.DEFINE_string("canaries", "", "The canaries' list (JSON): written by --insert_into (default: beside"
                                 " its directory, DIR_canaries.json), read to audit a run.")
_CANDIDATES = flags.DEFINE_integer("candidates", 2000, "Random secrets each canary is ranked among.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here (default: RUN/audit.json).")


def body() -> None:
  from tpu_lm.privacy import audit

  if _INSERT.value:
    try:
      repeats = [int(r) for r in _REPEATS.value]
    except ValueError:
      raise UserError(f"--repeats={','.join(_REPEATS.value)}: give whole numbers, e.g. 1,4,16,64.") from None
    if not repeats or min(repeats) < 1:
      raise UserError("--repeats needs one or more counts >= 1.")
    path = audit.insert(audit.make_canaries(repeats, _SEED.value), _INSERT.value, _CANARIES.value,
                        data_path=_DATA_PATH.value, suffix=_SUFFIX.value, max_documents=_MAX_DOCUMENTS.value)
    print(f"wrote {sum(repeats)} canary files for {len(repeats)} canaries into {_INSERT.value}, all in the"
          f" training split of data.path={_DATA_PATH.value or _INSERT.value}; list: {path}")
    return
  if not (_WORKDIR.value and _CANARIES.value):
    raise UserError("give --insert_into=DIR to write canaries, or --workdir=RUN --canaries=FILE to audit a run.")
  if _CANDIDATES.value < 10:
    raise UserError(f"--candidates={_CANDIDATES.value}: rank among at least 10 random secrets (2000 is usual).")
  from tpu_lm.inference import run_dir
  from tpu_lm.interpret import run

  canaries = audit.read_canaries(_CANARIES.value)
  config = run_dir.read_config(_WORKDIR.value, run_dir.resolve_step(_WORKDIR.value))
  audit.check_trained_on(config, canaries, _WORKDIR.value)  # before the model: a refusal is quick
  m = run.load(_WORKDIR.value)
  results = [audit.exposure(m, c, _CANDIDATES.value) for c in canaries]
  import math

  print(f"{m.workdir} at step {m.step}: exposure of {len(results)} canaries ({audit.LENGTH}-hex-digit secrets, a"
        f" {audit.LENGTH * 4}-bit space; the sampled estimate caps at log2({_CANDIDATES.value} + 1) ="
        f" {math.log2(_CANDIDATES.value + 1):.1f} bits)")
  print(f"{'repeats':>8} {'secret':>10} {'rank':>6} {'exposure (sampled)':>19} {'exposure (extrapolated)':>24}")
  for r in results:
    print(f"{r['repeats']:>8} {r['secret']:>10} {r['rank']:>6} {r['exposure_sampled']:>19.2f}"
          f" {r['exposure_extrapolated']:>24.2f}")
  out = _OUT.value or os.path.join(m.workdir, "audit.json")
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"wrote {out}")
