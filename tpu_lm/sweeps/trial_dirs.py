"""Which study and trial a sweep's run directory belongs to.

Training resumes whatever checkpoint it finds in its directory, so a trial must never
run where another study, or another parameter set, trained: it would evaluate the old
weights under new values. Directories are named by study and trial
(`<sweep_dir>/trials/<study>/NNNN`), and each holds a marker, `sweep_trial.json`,
written before the trial first trains: the study's own id (a random one made with
the study and kept in its user attrs; Optuna reuses its study ids once a database is
recreated), the trial's number and its parameters. The marker is checked before a
trial runs or resumes, and over all of the study's directories when a worker starts.
"""

import json
import os
import re
import uuid

from tpu_lm.errors import UserError

MARKER = "sweep_trial.json"
UID = "tpu_lm_study_id"  # the study's user attr holding its own id
_NAME = re.compile(r"^\w[\w.-]*$")


def new_uid() -> str:
  return uuid.uuid4().hex


def study_dir(directory: str, study_name: str) -> str:
  """Where the study's trial directories go."""
  if not _NAME.match(study_name):
    raise UserError(f"--study={study_name!r} cannot name the study's directory of trials: use letters, digits,"
                    " '_', '-' and '.'.")
  return os.path.join(directory, "trials", study_name)


def _fix(path: str) -> str:
  return f"use another --sweep_dir or --study, or delete {path}"


def _read(path: str) -> dict | None:
  """The directory's marker; None for a directory that does not exist or is empty."""
  try:
    with open(os.path.join(path, MARKER)) as f:
      return json.load(f)
  except FileNotFoundError:
    if os.path.isdir(path) and [f for f in os.listdir(path) if not f.startswith(f".{MARKER}.")]:  # (a cut write)
      raise UserError(f"trial directory {path} holds files but no {MARKER}, so this sweep did not make it:"
                      f" {_fix(path)}.") from None
    return None
  except (OSError, ValueError) as e:
    raise UserError(f"trial directory {path} has an unreadable {MARKER} ({e}): {_fix(path)}.") from None


def _check_study(path: str, marker: dict, study_name: str, uid: str) -> None:
  if marker.get("study_uid") != uid:
    which = ("an earlier study of the same name (its database was recreated, or another storage holds it)"
             if marker.get("study") == study_name else f"study {marker.get('study')!r}")
    raise UserError(f"trial directory {path} belongs to {which}, not to study {study_name!r}: {_fix(path)}.")


def check_all(path: str, study_name: str, uid: str) -> None:
  """Refuses (one UserError) when any directory under `path`, the study's, was made by
  another study: a worker checks before it trains anything."""
  if not os.path.isdir(path):
    return
  for name in sorted(os.listdir(path)):
    trial_path = os.path.join(path, name)
    if os.path.isdir(trial_path) and (marker := _read(trial_path)) is not None:
      _check_study(trial_path, marker, study_name, uid)


def claim(path: str, study_name: str, uid: str, number: int, params: dict) -> None:
  """Makes `path` trial `number`'s, with `params`, of the study: a new or empty
  directory gets the marker; one that has it must be this trial's (its resume)."""
  params = json.loads(json.dumps(params))  # as the marker holds them
  marker = _read(path)
  if marker is None:
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".{MARKER}.{os.getpid()}")
    with open(tmp, "w") as f:
      json.dump({"study": study_name, "study_uid": uid, "trial": number, "params": params}, f, indent=1)
    os.replace(tmp, os.path.join(path, MARKER))
    return
  _check_study(path, marker, study_name, uid)
  if (marker.get("trial"), marker.get("params")) != (number, params):
    raise UserError(f"trial directory {path} holds trial {marker.get('trial')} with {marker.get('params')}, not"
                    f" trial {number} with {params}: {_fix(path)}.")
