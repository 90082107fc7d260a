"""The offline code benchmark: standard-library functions whose docstrings hold doctests
(problems.py), completed by a run's model (bench.py), run in a guarded subprocess
(sandbox.py) and scored by pass@k (metrics.py). The command is tpu_lm/cli/codebench.py.

Nothing here imports JAX at module level: building the problem set and running the
sandbox need only the standard library.
"""
