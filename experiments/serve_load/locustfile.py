"""A second opinion on the server under load, from a standard load tool: locust's
users each send whole (not streamed) completions one after another, the same seeded
requests as run.py's clients. run.py starts it headless against each server
(--locust_s); by hand:

  locust -f experiments/serve_load/locustfile.py --headless -u 12 -r 12 -t 60s --host http://127.0.0.1:8000
"""

import itertools
import random

from locust import FastHttpUser, constant, task

_WORDS = "the model returns a list of values for each key in the table while".split()
_RNG = random.Random(0)
_REQUESTS = itertools.cycle([
    {"prompt": " ".join(_RNG.choice(_WORDS) for _ in range(_RNG.randint(2, 12)))[:64],
     "max_tokens": _RNG.randint(16, 64), "temperature": 0.8, "seed": i} for i in range(1000)])


class Completer(FastHttpUser):
  wait_time = constant(0)

  @task
  def complete(self):
    with self.client.post("/v1/completions", json=next(_REQUESTS), catch_response=True) as response:
      if response.status_code != 200 or not response.json()["choices"][0]["text"]:
        response.failure(f"status {response.status_code}")
