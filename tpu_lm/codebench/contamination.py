"""Which problems a run has trained on: its corpus, and the corpus of every run it was
fine-tuned from (`init_from`), checked as far as the data can be read here.

The default corpus (`python_stdlib`) is the standard library itself, the problems'
source: a run trained on it has seen every problem whose file is in its training split
(95% of files). A `text_files` corpus is searched for each function's source.
"""

from tpu_lm.codebench import problems as problems_lib
from tpu_lm.errors import UserError


def seen(config, problems: list[problems_lib.Problem], max_depth: int = 8) -> dict:
  """{"ids": the problems found in some corpus of the run's lineage, "checked": what was
  checked, one phrase per corpus, "unchecked": corpora that could not be}."""
  from tpu_lm.data.local_files import is_validation, user_files
  from tpu_lm.inference import run_dir

  ids, checked, unchecked = set(), [], []
  for _ in range(max_depth):
    data = config.data
    if data.dataset == "python_stdlib":
      ids |= {p.id for p in problems if not is_validation(p.path)}
      checked.append("python_stdlib (by file: its training split)")
    elif data.dataset == "text_files" and data.path:
      try:
        root, rels = user_files(data.path)
        text = "\n".join(problems_lib.normalized((root / r).read_text(encoding="utf-8", errors="replace"))
                         for r in rels)
        ids |= problems_lib.in_text(problems, text)
        checked.append(f"text_files {data.path} (by source)")
      except (UserError, OSError):
        unchecked.append(f"text_files {data.path} (not readable here)")
    else:
      unchecked.append(f"{data.dataset} {data.path}".strip())
    if not config.init_from:
      break
    try:
      config = run_dir.read_config(config.init_from, run_dir.resolve_step(config.init_from))
    except UserError:
      unchecked.append(f"the corpus of init_from {config.init_from} (run not readable here)")
      break
  return {"ids": sorted(ids), "checked": checked, "unchecked": unchecked}
