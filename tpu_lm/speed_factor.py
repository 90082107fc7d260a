"""How fast this CPU is at the work the base config does, as a factor against a reference machine.

2-core machines differ by up to ~2x in speed, so a wall-time budget only means something
next to the machine's speed. This times one fixed training step (GPT-2 style, 2 layers,
width 160, vocab 2048, batch 32 x 256 tokens, float32, AdamW + clipping) on random tokens:
the median of the steps after the warm-up. The 5-minute budget of configs/base.py was set
on a machine where this step takes 410 ms; factor = 410 ms / this machine's step, so 0.5
means half as fast and a 5-minute budget there is 10 minutes here.

The workload is written out here on purpose, not built from tpu_lm's model: the factor
must stay comparable across versions of the project. `tpu-lm speed` prints it.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

REFERENCE_MS = 410.0
BASE_BUDGET_S = 300.0
L, D, V, T, B, H = 2, 160, 2048, 256, 32, 2  # layers, width, vocab, tokens, batch, heads
WARMUP = 4  # the first steps include compilation


def init(key) -> dict:
  ks = jax.random.split(key, 2 + L)
  p = {"wte": jax.random.normal(ks[0], (V, D)) * 0.02, "wpe": jax.random.normal(ks[1], (T, D)) * 0.02,
       "lnf": jnp.ones((D,)), "blocks": []}
  for i in range(L):
    k = jax.random.split(ks[2 + i], 4)
    p["blocks"].append({"ln1": jnp.ones((D,)), "ln2": jnp.ones((D,)),
                        "qkv": jax.random.normal(k[0], (D, 3 * D)) * 0.02,
                        "proj": jax.random.normal(k[1], (D, D)) * 0.02,
                        "fc": jax.random.normal(k[2], (D, 4 * D)) * 0.02,
                        "fc2": jax.random.normal(k[3], (4 * D, D)) * 0.02})
  return p


def _norm(x, g):
  m = x.mean(-1, keepdims=True)
  return (x - m) * jax.lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * g


def loss_fn(p, x_BxT, y_BxT):
  b, t = x_BxT.shape
  h_BxTxD = p["wte"][x_BxT] + p["wpe"][:t]
  for blk in p["blocks"]:
    q, k, v = jnp.split(_norm(h_BxTxD, blk["ln1"]) @ blk["qkv"], 3, -1)
    q, k, v = (z.reshape(b, t, H, D // H) for z in (q, k, v))
    h_BxTxD = h_BxTxD + jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, D) @ blk["proj"]
    h_BxTxD = h_BxTxD + jax.nn.gelu(_norm(h_BxTxD, blk["ln2"]) @ blk["fc"]) @ blk["fc2"]
  logits_BxTxV = _norm(h_BxTxD, p["lnf"]) @ p["wte"].T
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, y_BxT).mean()


def step_fn():
  """The jitted training step (params, opt_state, x, y) -> (params, opt_state, loss), and its optimizer."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.95, weight_decay=0.1))

  @jax.jit
  def step(p, opt, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, x, y)
    u, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, u), opt, loss

  return step, tx


def measure(repeats: int = 10, warmup: int = WARMUP) -> dict:
  """Times `warmup` + `repeats` steps; the median of the last `repeats` is this machine's step.
  Returns step_ms, speed_factor (REFERENCE_MS / step_ms), base_budget_s (configs/base.py's 5
  minutes on this machine), repeats and the last loss."""
  step, tx = step_fn()
  rng = np.random.default_rng(0)
  p = init(jax.random.PRNGKey(0))
  opt = tx.init(p)
  times = []
  for i in range(warmup + repeats):
    x = rng.integers(0, V, (B, T + 1), dtype=np.int32)
    t0 = time.perf_counter()
    p, opt, loss = step(p, opt, x[:, :-1], x[:, 1:])
    loss.block_until_ready()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  ms = 1000 * float(np.median(times))
  factor = REFERENCE_MS / ms
  return {"step_ms": round(ms, 1), "speed_factor": round(factor, 3), "base_budget_s": round(BASE_BUDGET_S / factor),
          "repeats": repeats, "loss": round(float(loss), 4)}


def line(m: dict) -> str:
  """The one line `tpu-lm speed` prints."""
  return (f"reference step {m['step_ms']:.0f} ms (reference machine {REFERENCE_MS:.0f} ms): speed factor"
          f" {m['speed_factor']:.2f}; the 5-minute base budget is {m['base_budget_s']:.0f} s on this machine")
