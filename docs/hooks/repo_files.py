"""mkdocs hook: pages link to the repository's own files (plots, notebooks) as
`../path`, which is right on GitHub; the site gets a copy of each such file at `path`
and the link is rewritten to it. A `../path` that does not exist stays as written,
so the strict build fails on it."""

import os
import re

from mkdocs.structure.files import File

_LINK = re.compile(r"\]\(\.\./([^)#\s]+)")


def _repo_root(config) -> str:
  return os.path.dirname(os.path.abspath(config["docs_dir"]))


def _targets(config) -> set[str]:
  root, found = _repo_root(config), set()
  for name in os.listdir(config["docs_dir"]):
    if name.endswith(".md"):
      with open(os.path.join(config["docs_dir"], name), encoding="utf-8") as f:
        found.update(m.group(1) for m in _LINK.finditer(f.read()))
  return {t for t in found if not t.endswith(".md") and os.path.isfile(os.path.join(root, t))}


def on_files(files, config):
  root = _repo_root(config)
  for target in sorted(_targets(config)):
    files.append(File(target, root, config["site_dir"], config["use_directory_urls"]))
  return files


def on_page_markdown(markdown, page, config, files):
  root = _repo_root(config)

  def local(m):
    target = m.group(1)
    if target.endswith(".md") or not os.path.isfile(os.path.join(root, target)):
      return m.group(0)
    return "](" + target

  return _LINK.sub(local, markdown)
