"""mkdocs hook: the catalogue of one-line errors on the troubleshooting page, generated
from the source, so that every error a user can meet is listed: each `UserError(...)`,
`exit_with(...)`, config check (`checks.fail`) and flag rule (`cli.check_flag`,
`at_least`, `positive`) in tpu_lm/, with its message as written there (`{...}` stands
for the value the message names)."""

import ast
import os

MARKER = "<!-- error-catalogue -->"


def _text(node, source: str) -> str:
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value
  if isinstance(node, ast.JoinedStr):
    out = []
    for part in node.values:
      if isinstance(part, ast.Constant):
        out.append(str(part.value))
      else:
        out.append("{" + ast.get_source_segment(source, part.value) + "}")
    return "".join(out)
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    return _text(node.left, source) + _text(node.right, source)
  return "{" + (ast.get_source_segment(source, node) or "...") + "}"


def _flag_names(tree) -> dict[str, str]:
  names = {}
  for node in tree.body:
    if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and node.value.args
        and isinstance(node.value.func, ast.Attribute) and node.value.func.attr.startswith("DEFINE")
        and isinstance(node.value.args[0], ast.Constant)):
      for target in node.targets:
        if isinstance(target, ast.Name):
          names[target.id] = node.value.args[0].value
  return names


def messages(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    source = f.read()
  tree = ast.parse(source)
  flags = _flag_names(tree)
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    args = node.args

    def flag(holder):
      return "--" + flags.get(getattr(holder, "id", ""), "FLAG") + "={value}"

    if name in ("UserError", "exit_with") and args:
      found.append((node.lineno, _text(args[0], source)))
    elif name == "fail" and len(args) == 3:
      found.append((node.lineno, f"config field {_text(args[0], source)} is {_text(args[1], source)}: "
                    f"{_text(args[2], source)}."))
    elif name == "check_flag" and len(args) == 3 and getattr(args[0], "id", "") != "holder":
      found.append((node.lineno, f"{flag(args[0])} is invalid: {_text(args[2], source)}."))
    elif name == "at_least" and len(args) == 2:
      found.append((node.lineno, f"{flag(args[0])} is invalid: it must be at least {_text(args[1], source)}."))
    elif name == "positive" and len(args) == 1 and isinstance(func, ast.Attribute):
      found.append((node.lineno, f"{flag(args[0])} is invalid: it must be positive."))
  whole = lambda m: m.startswith("{") and m.endswith("}") and m.count("{") == 1  # a message passed on
  return [m for _, m in sorted(found) if not whole(m)]


def _cell(text: str) -> str:
  return "`" + text.replace("`", "'").replace("\n", " ") + "`"  # a pipe inside a code span splits no cell


def render(root: str) -> str:
  out = []
  package = os.path.join(root, "tpu_lm")
  for directory, dirs, files in sorted(os.walk(package)):
    dirs.sort()
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      found = messages(path)
      if found:
        rel = os.path.relpath(path, root)
        out += ["", f"### `{rel}`", "", "| message (`error: ` and this, exit code 2) |", "|---|"]
        out += [f"| {_cell(m)} |" for m in found]
  return "\n".join(out) + "\n"


def on_page_markdown(markdown, page, config, files):
  if MARKER not in markdown:
    return markdown
  root = os.path.dirname(os.path.abspath(config["docs_dir"]))
  return markdown.replace(MARKER, render(root))
