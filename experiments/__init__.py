"""Reproducible studies, one shape for all: experiments/<name>/run.py runs the real
commands, puts a results entry on top of results.md beside it through record.py (date,
machine, CPU speed factor from `tpu-lm speed`, the command last) and draws its plot
(plots.py, or its own). From the repository root, either of

  python -m experiments.<name>.run [--flags]
  python experiments/<name>/run.py [--flags]   (it re-executes itself as the module)

No folder here carries a standard-library name (interpret/, not inspect/): a script run
by its path, such as plots.py, puts this folder first on sys.path, where it would shadow
the library's module.
"""
