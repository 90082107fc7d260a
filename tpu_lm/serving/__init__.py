"""The HTTP transport of the server (python -m tpu_lm.serve): requests in, the
engine's events out. The engine (tpu_lm/inference/engine.py) knows nothing of HTTP."""
