"""The server (python -m tpu_lm.serve): an ASGI app on uvicorn. requests.py and
schema.py read a request, app.py routes it to the engine (tpu_lm/inference/engine.py,
which knows nothing of HTTP), choices.py turns tokens into text; guard.py and
protocol.py hold the limits, server.py runs it."""
