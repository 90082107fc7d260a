"""Benchmarks the way the field runs them: EleutherAI's lm-evaluation-harness with a
tpu_lm run as its model (model.py), the commands and in-training hook that run its
tasks and keep their results (benchmarks.py).

lm-eval is an optional extra (`pip install 'tpu_lm[eval]'`): nothing here imports it
until a harness task is asked for, and then its absence is one line naming the extra.
"""
