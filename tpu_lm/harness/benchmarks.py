"""Running lm-evaluation-harness tasks on a tpu_lm model and keeping what they found:
which tasks a `--tasks` value names (catalog names, or local YAML files), the
harness's own results (its table, its JSON) in the run directory, and each task's
metrics as flat names (`harness/<task>/<metric>`) for metrics.jsonl, TensorBoard and
sweeps.
"""

import datetime
import importlib
import json
import logging
import math
import os

from tpu_lm import storage
from tpu_lm.errors import UserError

PREFIX = "harness/"
# Metrics where lower is better (lm-eval's perplexity-style ones); every other is an
# accuracy, F1, exact match, pass rate...: higher is better.
_LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def require() -> None:
  """UserError unless lm-evaluation-harness is installed."""
  try:
    importlib.import_module("lm_eval")
  except ImportError:
    raise UserError("lm-evaluation-harness is not installed: pip install 'tpu_lm[eval]' (it adds lm-eval).") from None
  # lm-eval logs every task it builds and every dataset it reads at INFO: our lines say what ran.
  logging.getLogger("lm_eval").setLevel(logging.WARNING)


def resolve(spec: str, include_path: str = ""):
  """(task names, lm_eval TaskManager) for `spec`: comma-separated lm-eval task, group
  or tag names, or YAML files of tasks (their `task:` named; their folder is searched,
  with its subfolders, as lm-eval searches an include path: keep task files in a folder
  of their own). An unknown name is one UserError listing them."""
  require()
  from lm_eval.tasks import TaskManager

  items = [t.strip() for t in spec.split(",") if t.strip()]
  if not items:
    raise UserError("no harness task given: pass --tasks=NAME[,NAME...] (lm-eval names such as hellaswag,arc_easy)"
                    " or the path of a task YAML file.")
  paths = []
  if include_path:
    if not os.path.isdir(include_path):
      raise UserError(f"the task folder {include_path} does not exist: pass a folder of lm-eval task YAML files.")
    paths.append(os.path.abspath(include_path))
  names = []
  for item in items:
    if item.endswith(".yml"):  # lm-eval's index reads *.yaml files only
      raise UserError(f"task file {item}: lm-eval reads task files named *.yaml only; rename it.")
    if item.endswith(".yaml"):
      names.append(_yaml_task_name(item))
      paths.append(os.path.dirname(os.path.abspath(item)))
    else:
      names.append(item)
  # Local tasks alone first: indexing lm-eval's catalog (thousands of YAML files) takes seconds.
  manager = TaskManager(include_path=sorted(set(paths)), include_defaults=False) if paths else None
  if manager is None or not all(manager.match_tasks([n]) for n in names):
    manager = TaskManager(include_path=sorted(set(paths)) or None)
  unknown = [n for n in names if not manager.match_tasks([n])]
  if unknown:
    raise UserError(f"unknown lm-eval task {', '.join(map(repr, unknown))}: use a task name `lm_eval --tasks list`"
                    " shows (e.g. hellaswag, arc_easy, lambada_openai) or the path of a task YAML file.")
  return names, manager


def _yaml_task_name(path: str) -> str:
  if not os.path.isfile(path):
    raise UserError(f"task file {path} does not exist (relative paths start at {os.getcwd()}).")
  import yaml

  class _Loader(yaml.SafeLoader):  # lm-eval's `!function module.name` tags name code: not needed for the name
    pass

  _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
  try:
    with open(path) as f:
      config = yaml.load(f, Loader=_Loader)
  except yaml.YAMLError as e:
    raise UserError(f"task file {path} is not valid YAML ({str(e).splitlines()[0]}): fix it.") from None
  name = config.get("task") if isinstance(config, dict) else None
  if not isinstance(name, str) or not name:
    raise UserError(f"task file {path} has no `task:` name: an lm-eval task YAML names its task (task: my_task).")
  return name


def write_local_task(directory: str, name: str, documents: list[dict], spec: str) -> str:
  """A task lm-eval reads with no download: `documents` as `name`.jsonl and `name`.yaml
  naming it (dataset_path: json), `spec` the rest of the task's YAML (output_type,
  doc_to_text, metric_list, ...). Returns the YAML file's path (a --tasks value)."""
  data = os.path.join(directory, f"{name}.jsonl")
  with open(data, "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in documents)
  path = os.path.join(directory, f"{name}.yaml")
  with open(path, "w") as f:
    f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(data)}\n"
            f"test_split: test\n{spec}")
  return path


def evaluate(lm, names: list[str], manager, *, num_fewshot: int = -1, limit: float = 0, log_samples: bool = False,
             bootstrap_iters: int = 100000, apply_chat_template: bool = False, seed: int = 0) -> dict:
  """lm_eval.simple_evaluate of `names` with `lm` (model.TpuLM): the harness's results
  dict. A task whose dataset cannot be read (a catalog task without network) is one
  UserError naming it."""
  import lm_eval

  try:
    return lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, num_fewshot=None if num_fewshot < 0 else num_fewshot,
        limit=limit or None, log_samples=log_samples, bootstrap_iters=bootstrap_iters,
        apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)
  except FileNotFoundError as e:  # a local task's data_files
    raise UserError(f"a task of {', '.join(names)} names a data file that does not exist ({e}): fix the path in its"
                    " YAML (dataset_kwargs: data_files).") from None
  except (ConnectionError, OSError) as e:  # requests', urllib3's and datasets' network errors are these
    raise UserError(f"a task of {', '.join(names)} could not read its dataset ({type(e).__name__}:"
                    f" {str(e).splitlines()[0][:200] if str(e) else ''}): catalog tasks download from the Hugging"
                    " Face Hub, so run where the network exists, or write a local task YAML (dataset_path: json).")


def metrics(results: dict) -> dict[str, float]:
  """{'harness/<task>/<metric>': value} of every task and group in `results`: the
  metric as lm-eval names it, with its filter when not 'none' (acc, exact_match_strict)."""
  flat = {}
  for column in ("results", "groups"):
    for task, values in (results.get(column) or {}).items():
      for key, value in values.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
          continue
        if isinstance(value, float) and math.isnan(value):
          continue
        flat[f"{PREFIX}{task}/{metric}{'' if filt == 'none' else '_' + filt}"] = float(value)
  return flat


def direction(metric: str) -> str:
  """'maximize' or 'minimize' for a harness metric name (a sweep's objective)."""
  name = metric.rsplit("/", 1)[-1]
  return "minimize" if any(name == m or name.startswith(m + "_") for m in _LOWER_IS_BETTER) else "maximize"


def table(results: dict) -> str:
  """The harness's own markdown table (and its groups'), as lm_eval prints it."""
  from lm_eval.utils import make_table

  text = make_table(results)
  if results.get("groups"):
    text += "\n" + make_table(results, "groups")
  return text


def write(results: dict, directory: str) -> str:
  """The results as lm-eval's JSON (results.json), its table (results.md) and, when
  logged, each task's samples (samples_<task>.jsonl) in a new folder under
  `directory` named by the time: an earlier evaluation is never overwritten."""
  from lm_eval.utils import handle_non_serializable

  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
  out, n = os.path.join(directory, stamp), 1
  while storage.exists(out):
    n += 1
    out = os.path.join(directory, f"{stamp}_{n}")
  storage.makedirs(out)
  kept = {k: v for k, v in results.items() if k != "samples"}
  with storage.open(os.path.join(out, "results.json"), "w") as f:
    f.write(json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False))
  with storage.open(os.path.join(out, "results.md"), "w") as f:
    f.write(table(results))
  for task, samples in (results.get("samples") or {}).items():
    with storage.open(os.path.join(out, f"samples_{task}.jsonl"), "w") as f:
      for s in samples:
        f.write(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n")
  return out
