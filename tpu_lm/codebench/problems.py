"""The problem set: top-level functions of the standard library whose docstrings hold
doctest examples, each self-contained (it needs only builtins and the module's imports)
and checked in the sandbox: the real body passes its examples, a body that raises does
not.

A problem's prompt is the imports the function needs, its signature and its docstring;
the model writes the body; the docstring's examples are the test. The set is built
once and shipped (problems.jsonl beside this file, sorted by id) so numbers from
different machines and Python versions are comparable; `python -m tpu_lm.codebench
--build_problems=PATH` rebuilds it from the running Python's standard library, and
`--exclude_corpus=DIR` drops the functions whose source appears in a training corpus.
"""

import ast
import builtins
import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import sysconfig

from tpu_lm.errors import UserError

FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "problems.jsonl")
NAME = "stdlib-doctests"
# Folders of the standard library left out: tests, and programs rather than libraries.
SKIPPED = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "ensurepip", "tkinter", "__phello__"}
_BUILTINS = set(dir(builtins))
MAX_PROMPT_CHARS = 4000  # helpers included: a prompt longer than this is not a function's completion any more


@dataclasses.dataclass(frozen=True)
class Problem:
  id: str  # "module.function": stable across rebuilds
  module: str
  path: str  # the source file, relative to the standard library's directory
  prompt: str  # imports + signature + docstring, ending in a newline: what the model continues
  canonical: str  # the real body, after the docstring
  test: str  # the docstring: its doctest examples are the test
  python: str  # the Python whose standard library it was read from

  def program(self, body: str) -> str:
    return self.prompt + body


def read(path: str = FILE) -> list[Problem]:
  try:
    with open(path, encoding="utf-8") as f:
      return [Problem(**json.loads(line)) for line in f if line.strip()]
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"cannot read the problem file {path} ({type(e).__name__}: {e}): rebuild it with"
                    " python -m tpu_lm.codebench --build_problems=PATH.") from None


def version(path: str = FILE) -> str:
  """The set's name and the start of its file's hash: equal versions, equal problems."""
  with open(path, "rb") as f:
    return f"{NAME}@{hashlib.sha256(f.read()).hexdigest()[:12]}"


def write(problems: list[Problem], path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for p in sorted(problems, key=lambda p: p.id):
      f.write(json.dumps(dataclasses.asdict(p), sort_keys=True) + "\n")


def stdlib_sources() -> list[tuple[str, str]]:
  """(module name, path relative to the standard library) of its .py files, sorted."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if SKIPPED & set(rel.parts[:-1]) or rel.name.startswith("test_"):
      continue
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    if parts and all(p.isidentifier() for p in parts):
      found.append((".".join(parts), rel.as_posix()))
  return found


def candidates(module: str, rel: str, source: str) -> list[Problem]:
  """The module's problems before the sandbox has checked them."""
  try:
    tree = ast.parse(source)
  except SyntaxError:
    return []
  imports = _imports(tree, module, rel.endswith("__init__.py"))
  defined = _definitions(tree)
  lines = source.splitlines(keepends=True)
  found = []
  for node in tree.body:
    if not isinstance(node, ast.FunctionDef) or node.decorator_list:
      continue
    test = ast.get_docstring(node)
    if not test or ">>>" not in test or len(node.body) < 2:
      continue
    doc_end = node.body[0].end_lineno
    if node.body[1].lineno <= doc_end:  # code on the docstring's last line
      continue
    context = _context(node, imports, defined)
    if context is None:
      continue
    header, helpers = context
    segment = lambda n: "".join(lines[_first_line(n) - 1:n.end_lineno])
    parts = ["".join(f"{h}\n" for h in header)] if header else []
    parts += [segment(n) for n in helpers]
    prompt = "\n\n".join(p.rstrip("\n") + "\n" for p in parts) + ("\n\n" if parts else "")
    prompt += "".join(lines[node.lineno - 1:doc_end])
    if len(prompt) > MAX_PROMPT_CHARS:
      continue
    found.append(Problem(id=f"{module}.{node.name}", module=module, path=rel, prompt=prompt,
                         canonical="".join(lines[doc_end:node.end_lineno]), test=test,
                         python=platform.python_version()))
  return found


def _first_line(node) -> int:
  return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _definitions(tree) -> dict[str, ast.stmt]:
  """Name -> the top-level statement that defines it: a function, a class, or an
  assignment to plain names (the last one wins, as at run time)."""
  defined = {}
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      defined[node.name] = node
    elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      if all(isinstance(t, ast.Name) for t in targets):
        for t in targets:
          defined[t.id] = node
  return defined


def _context(node, imports: dict[str, str], defined: dict[str, ast.stmt]):
  """(import lines, helper statements in source order) the function needs, following
  helpers' own needs; None if it needs anything else (a name bound in an `if` or a
  `try`, a star import, `global`)."""
  header, helpers, todo, seen = set(), set(), [node], set()
  while todo:
    current = todo.pop()
    needed = _free_names(current)
    if needed is None:
      return None
    for name in sorted(needed - _BUILTINS - seen):
      seen.add(name)
      if name in imports:
        header.add(imports[name])
      elif name in defined and defined[name] is not node:
        helpers.add(defined[name])
        todo.append(defined[name])
      elif name != node.name:
        return None
  order = list(imports.values())
  return sorted(header, key=order.index), sorted(helpers, key=lambda n: n.lineno)


def _imports(tree, module: str, is_package: bool) -> dict[str, str]:
  """Name -> the import statement (as source) that binds it, for the module's top-level imports."""
  package = module.split(".") if is_package else module.split(".")[:-1]
  bound = {}
  for node in tree.body:
    if isinstance(node, ast.Import):
      for a in node.names:
        bound[a.asname or a.name.split(".")[0]] = f"import {a.name}" + (f" as {a.asname}" if a.asname else "")
    elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
      base = node.module or ""
      if node.level:  # relative: made absolute, as the prompt stands alone
        parent = package[:len(package) - node.level + 1]
        base = ".".join(parent + ([node.module] if node.module else []))
      for a in node.names:
        if a.name != "*":
          bound[a.asname or a.name] = f"from {base} import {a.name}" + (f" as {a.asname}" if a.asname else "")
  return bound


def _free_names(node: ast.stmt) -> set[str] | None:
  """The names a statement reads from outside itself (None if it declares globals)."""
  bound, loaded = set(), set()
  for sub in ast.walk(node):
    if isinstance(sub, (ast.Global, ast.Nonlocal)):
      return None
    if isinstance(sub, ast.Name):
      (loaded if isinstance(sub.ctx, ast.Load) else bound).add(sub.id)
    elif isinstance(sub, ast.arg):
      bound.add(sub.arg)
    elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(sub.name)
    elif isinstance(sub, ast.alias):
      bound.add(sub.asname or sub.name.split(".")[0])
    elif isinstance(sub, ast.ExceptHandler) and sub.name:
      bound.add(sub.name)
    elif isinstance(sub, (ast.MatchAs, ast.MatchStar)) and sub.name:
      bound.add(sub.name)
  if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
    bound.add(node.name)
  return loaded - bound


def normalized(text: str) -> str:
  """Whitespace runs as one space: a function re-indented or re-wrapped is still found."""
  return " ".join(text.split())


def function_source(p: Problem) -> str:
  """The function as written in its module (the prompt without its imports, and the body)."""
  return p.prompt[p.prompt.index("def "):] + p.canonical


def corpus_text(directory: str) -> str:
  """Every file under `directory`, read as text and normalized, joined."""
  if not os.path.isdir(directory):
    raise UserError(f"--exclude_corpus={directory} is not a directory: pass the folder of the training corpus.")
  texts = []
  for path in sorted(pathlib.Path(directory).rglob("*")):
    if path.is_file():
      texts.append(normalized(path.read_text(encoding="utf-8", errors="replace")))
  return "\n".join(texts)


def in_text(problems: list[Problem], text: str) -> set[str]:
  """The ids of the problems whose function source appears in `text` (normalized)."""
  return {p.id for p in problems if normalized(function_source(p)) in text}


def verified(problems: list[Problem], workers: int = 2) -> list[Problem]:
  """The problems whose real body passes its examples (twice: string hashing differs
  between runs, so set order does too) and whose body replaced by a `raise` fails them."""
  from tpu_lm.codebench import sandbox

  jobs = []
  for p in problems:
    indent = p.canonical[:len(p.canonical) - len(p.canonical.lstrip(" \t"))] or "    "
    jobs += [(p.program(p.canonical), p.test, p.id)] * 2
    jobs.append((p.program(f"{indent}raise NotImplementedError\n"), p.test, p.id))
  outcomes = sandbox.run_many(jobs, workers=workers)
  return [p for i, p in enumerate(problems)
          if outcomes[3 * i].status == outcomes[3 * i + 1].status == "passed" and outcomes[3 * i + 2].status != "passed"]


def build(exclude_corpora: tuple[str, ...] = (), workers: int = 2) -> tuple[list[Problem], dict]:
  """The verified problems of the running Python's standard library, minus those whose
  source appears in any of `exclude_corpora` (directories); and counts of what was dropped."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = []
  for module, rel in stdlib_sources():
    found += candidates(module, rel, (root / rel).read_text(encoding="utf-8", errors="replace"))
  found.sort(key=lambda p: p.id)
  seen = set()
  for directory in exclude_corpora:
    seen |= in_text(found, corpus_text(directory))
  kept = verified([p for p in found if p.id not in seen], workers)
  return kept, {"candidates": len(found), "in_corpus": len(seen), "failed_verification": len(found) - len(seen) - len(kept)}
