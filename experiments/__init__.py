"""Reproducible studies, one shape for all: experiments/<name>/run.py runs the real
commands, puts a results entry on top of results.md beside it through record.py (date,
machine, CPU speed factor from `tpu-lm speed`, the command last) and draws its plot
(plots.py, or its own). From the repository root, either of

  python -m experiments.<name>.run [--flags]
  python experiments/<name>/run.py [--flags]   (it re-executes itself as the module)

The scripts beside this file (plots.py, hf_peer.py) re-execute themselves as modules
the same way. No folder here carries a standard-library name (interpret/, not inspect/):
a file run by its path puts its folder first on sys.path, where such a name would shadow
the library's module.
"""
