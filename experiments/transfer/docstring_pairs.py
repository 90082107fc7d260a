"""An offline instruction-tuning set: stdlib functions as {"prompt", "completion"} pairs.

The prompt is a function's signature and docstring, the completion its body: "write
the code this docstring describes". Functions without a docstring, or whose body is
longer than --max_chars, are left out.

  python experiments/transfer/docstring_pairs.py --out=workdirs/docstring_pairs.jsonl
  python -m tpu_lm.main --config=configs/finetune.py:workdirs/base --workdir=workdirs/instruct \\
      --config.data.dataset=instructions --config.data.path=workdirs/docstring_pairs.jsonl
"""

if __name__ == "__main__" and not __package__:  # run as a file: rerun as `python -m experiments.transfer.docstring_pairs`
  import os
  import sys

  os.execv(sys.executable, [sys.executable, "-m", "experiments.transfer.docstring_pairs", *sys.argv[1:]])

import argparse
import ast
import json
import os
import sys

from tpu_lm.data import local_files  # noqa: E402


def pairs(max_chars: int):
  root, rel = local_files.stdlib_files()
  for r in rel:
    if r.split("/")[0] in ("test", "idlelib", "lib2to3"):
      continue
    source = local_files.read_text(root / r)
    try:
      tree = ast.parse(source)
    except SyntaxError:
      continue
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
      if not isinstance(node, ast.FunctionDef) or not ast.get_docstring(node) or len(node.body) < 2:
        continue
      doc_end = node.body[0].end_lineno  # the docstring is the first statement
      prompt = "".join(lines[node.lineno - 1 - len(node.decorator_list): doc_end])
      completion = "".join(lines[doc_end: node.end_lineno])
      if 0 < len(completion) <= max_chars and len(prompt) <= 2 * max_chars:
        yield {"prompt": prompt, "completion": completion}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default="workdirs/docstring_pairs.jsonl")
  p.add_argument("--max_chars", type=int, default=600)
  args = p.parse_args()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  n = 0
  with open(args.out, "w") as f:
    for pair in pairs(args.max_chars):
      f.write(json.dumps(pair) + "\n")
      n += 1
  print(f"wrote {n} pairs to {args.out}")


if __name__ == "__main__":
  main()
