"""pass@k: the chance that at least one of k samples passes, estimated without bias from
n >= k samples of which c passed (Chen et al. 2021, "Evaluating Large Language Models
Trained on Code", section 2.1).

  pass@k = 1 - C(n - c, k) / C(n, k)

computed as the product 1 - prod_{i = n - c + 1}^{n} (1 - k / i), which never forms the
binomials (they overflow a float for n in the hundreds).
"""


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased estimate for one problem with `c` of `n` samples correct."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:  # every draw of k samples holds a correct one
    return 1.0
  product = 1.0
  for i in range(n - c + 1, n + 1):
    product *= 1.0 - k / i
  return 1.0 - product


def mean_pass_at_k(counts: list[tuple[int, int]], k: int) -> float:
  """The benchmark's pass@k: the mean over problems of each one's (n, c) estimate."""
  if not counts:
    return float("nan")
  return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
