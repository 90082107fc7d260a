"""mkdocs hook: the configuration reference's tables (the page's marker replaced),
generated from tpu_lm/config/defaults.py, where every field is declared with its default, the comment
that documents it and the values it may take (one home per field)."""

import ast
import inspect
import os
import sys

MARKER = "<!-- config-reference -->"


def _comments(source: str, owner: str, prefix: str) -> dict[str, str]:  # in source order
  """Field path -> its comment: the comment lines just above `owner.x.y = ...` and the
  comment at the end of that line."""
  lines = source.splitlines()
  docs = {}
  nodes = sorted((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Assign)), key=lambda n: n.lineno)
  for node in nodes:
    if len(node.targets) != 1:
      continue
    parts, target = [], node.targets[0]
    while isinstance(target, ast.Attribute):
      parts.insert(0, target.attr)
      target = target.value
    if not (isinstance(target, ast.Name) and target.id == owner and parts):
      continue
    above, i = [], node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
      above.insert(0, lines[i].strip().lstrip("#").strip())
      i -= 1
    line = lines[node.end_lineno - 1]
    trailing = line.split("  # ", 1)[1].strip() if "  # " in line else ""
    docs[prefix + ".".join(parts)] = " ".join(t for t in (" ".join(above), trailing) if t)
  return docs


def _value(config, field: str):
  for part in field.split("."):
    config = config[part]
  return config


def _code(value) -> str:
  """A value as a code span (a pipe inside one does not split a table cell)."""
  return "`" + str(value).replace("`", "'").replace("\n", " ") + "`"


def _prose(text) -> str:
  """A comment as table-cell text: pipes, emphasis marks and tags shown as written."""
  return str(text).replace("|", "&#124;").replace("*", "\\*").replace("<", "&lt;").replace("\n", " ")


def render(root: str) -> str:
  sys.path.insert(0, root)
  try:
    from tpu_lm.config import defaults
  finally:
    sys.path.remove(root)
  docs = _comments(inspect.getsource(defaults.get_config), "c", "")
  docs.update(_comments(inspect.getsource(defaults.llama_block), "m", "model."))
  config = defaults.get_config()
  gpt2 = defaults.get_config()
  defaults.gpt2_block(gpt2.model)

  def allowed(field: str) -> str:
    if field in defaults.CHOICES:
      return ", ".join(f"`{v!r}`" for v in defaults.CHOICES[field])
    if field in defaults.POSITIVE_INTS:
      return "an integer > 0"
    if field in defaults.NON_NEGATIVE:
      return ">= 0"
    return ""

  out = []
  sections = [f for f in docs if "." not in f and hasattr(_value(config, f), "keys")]
  top = [f for f in docs if "." not in f and f not in sections]
  row = "| field | default | allowed | what it does |\n|---|---|---|---|"
  out += ["## Top level", "", row]
  out += [_row(f, _value(config, f), docs, allowed, None) for f in top]
  for section in sections:
    out += ["", f"## `{section}`", ""]
    if docs.get(section):
      out += [_prose(docs[section]), ""]
    out.append(row)
    fields = [f for f in docs if f.startswith(section + ".") and f.count(".") == 1]
    out += [_row(f, _value(config, f), docs, allowed, gpt2) for f in fields]
  return "\n".join(out) + "\n"


def _row(field, value, docs, allowed, gpt2) -> str:
  default = _code(value.to_dict() if hasattr(value, "to_dict") else repr(value))
  if gpt2 is not None and field.startswith("model.") and _value(gpt2, field) != value:
    default += f" (GPT-2 block: {_code(repr(_value(gpt2, field)))})"
  return f"| `{field}` | {default} | {allowed(field)} | {_prose(docs.get(field, ''))} |"


def on_page_markdown(markdown, page, config, files):
  if MARKER not in markdown:
    return markdown
  root = os.path.dirname(os.path.abspath(config["docs_dir"]))
  return markdown.replace(MARKER, render(root))
