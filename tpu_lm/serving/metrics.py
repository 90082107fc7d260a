"""The server's Prometheus metrics (GET /metrics, the text exposition format): requests
by route and status, the engine's queue and running sequences, time to first token,
inter-token latency, and tokens read and generated. Each server has its own registry,
so servers in one process (tests) do not mix their counts."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: a CPU's first token of a tiny model takes milliseconds, a loaded server's seconds.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
  def __init__(self, engine, routes: set[str]):
    self.registry = registry = CollectorRegistry()
    self._routes = routes  # others are counted as "other": a scanner's paths must not grow the label set
    self._requests = Counter("tpu_lm_requests", "HTTP requests answered, by route, method and status.",
                             ["route", "method", "status"], registry=registry)
    Gauge("tpu_lm_queue_depth", "Sequences waiting for a decoding slot.",
          registry=registry).set_function(engine.queued)
    Gauge("tpu_lm_running_sequences", "Sequences being decoded.", registry=registry).set_function(engine.running)
    self.time_to_first_token = Histogram(
        "tpu_lm_time_to_first_token_seconds", "From a request's arrival to its first generated token.",
        buckets=_LATENCY_BUCKETS, registry=registry)
    self.inter_token_latency = Histogram(
        "tpu_lm_inter_token_latency_seconds", "Between successive tokens of one sequence.",
        buckets=_LATENCY_BUCKETS, registry=registry)
    self.request_duration = Histogram(
        "tpu_lm_request_duration_seconds", "From a request's arrival to its last byte, by route.", ["route"],
        buckets=_LATENCY_BUCKETS, registry=registry)
    self.generated_tokens = Counter("tpu_lm_generated_tokens", "Tokens generated (end-of-sequence included).",
                                    registry=registry)
    self.prompt_tokens = Counter("tpu_lm_prompt_tokens", "Prompt tokens read.", registry=registry)

  def route(self, path: str) -> str:
    return path if path in self._routes else "other"

  def answered(self, path: str, method: str, status: int, seconds: float) -> None:
    route = self.route(path)
    self._requests.labels(route, method if method in ("GET", "POST", "HEAD") else "other", str(status)).inc()
    self.request_duration.labels(route).observe(seconds)

  def exposition(self) -> bytes:
    return generate_latest(self.registry)
