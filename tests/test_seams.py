"""The seams the second half builds on: one projection layer (Qwix quantization and
LoRA apply to the real model), inference standing alone, and an import of tpu_lm
that leaves the process's environment as it was."""

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from tpu_lm.config import derived
from tpu_lm.model import transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, num_kv_heads=2, tie_embeddings=False)


@pytest.fixture(scope="module")
def llama():
  cfg = dataclasses.replace(derived.model_config(tiny_config()), d_model=64, mlp_dim=128, **LLAMA)
  rng = np.random.default_rng(0)
  inputs = (jnp.asarray(rng.integers(3, 259, (2, 16)), jnp.int32), jnp.ones((2, 16), jnp.int32),
            jnp.broadcast_to(jnp.arange(16), (2, 16)))
  model = transformer.Transformer(cfg)
  params = nn.meta.unbox(model.init(jax.random.key(0), *inputs)["params"])
  return model, params, inputs


def test_every_weight_matmul_is_one_dense_layer(llama):
  """q, k, v, out, gate, up, down and the untied unembedding: all nn.Dense kernels."""
  _, params, _ = llama
  kernels = sorted(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
                   if "kernel" in jax.tree_util.keystr(p))
  per_layer = {"attn']['query", "attn']['key", "attn']['value", "attn']['out", "mlp']['gate", "mlp']['up",
               "mlp']['down"}
  assert len(kernels) == 2 * len(per_layer) + 1 and any("unembed" in k for k in kernels)
  for name in per_layer:
    assert sum(name in k for k in kernels) == 2, name


def test_qwix_int8_weight_quantization_stays_close_to_the_float_model(llama):
  import qwix

  model, params, inputs = llama
  ref = model.apply({"params": params}, *inputs)
  ptq = qwix.quantize_model(model, qwix.PtqProvider([qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8)]))
  abstract = jax.eval_shape(ptq.init, jax.random.key(0), *inputs)["params"]
  quantized = qwix.quantize_params(params, abstract)
  kernel = quantized["layers_0"]["attn"]["query"]["kernel"].array
  assert kernel.qvalue.dtype == jnp.int8 and kernel.scale.shape == (1, 32)  # integers, per-channel scales
  out = ptq.apply({"params": quantized}, *inputs)
  err = float(jnp.max(jnp.abs(out - ref)))
  assert 0 < err < 0.02 * float(jnp.max(jnp.abs(ref))), err


@pytest.mark.slow  # every projection through qwix, forward and gradient
def test_qwix_lora_adds_adapters_to_every_projection_and_starts_as_the_model(llama):
  import qwix

  model, params, inputs = llama
  lora = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0))
  lora_params = nn.meta.unbox(lora.init(jax.random.key(1), *inputs)["params"])
  adapters = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(lora_params) if "kernel_lora_a" in jax.tree_util.keystr(p)]
  assert len(adapters) == 15  # 7 projections x 2 layers + the unembedding
  merged = jax.tree.map(lambda x: x, lora_params)
  for path, value in jax.tree_util.tree_leaves_with_path(params):  # the trained weights under the adapters
    node = merged
    *parents, leaf = [k.key for k in path]
    for k in parents:
      node = node[k]
    node[leaf] = value
  # LoRA's B starts at zero: the adapted model is exactly the model ...
  np.testing.assert_allclose(lora.apply({"params": merged}, *inputs), model.apply({"params": params}, *inputs), atol=1e-6)
  # ... and its adapters get gradients while training moves them.
  def loss(p):
    return jnp.mean(lora.apply({"params": p}, *inputs)[..., 5])

  grads = jax.grad(loss)(merged)
  assert float(jnp.abs(grads["layers_0"]["attn"]["query"]["kernel_lora_b"]).sum()) > 0


_INFERENCE_ONLY = """
import json, os, resource, sys
before = dict(os.environ)
import tpu_lm
from tpu_lm.inference import run_dir, sampling
env_set = [k for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "ALLOW_MULTIPLE_LIBTPU_LOAD")
           if k in os.environ and k not in before]
run = run_dir.load(sys.argv[1])
[c] = run.decoder.generate([run.encode_prompt("the model")], sampling.Sampling(4, 0.0))
training = [m for m in sys.modules if m.split(".")[0] in ("optax", "grain", "tensorflow", "tensorflow_datasets")
            or m.startswith(("tpu_lm.training", "tpu_lm.data.pipeline", "tpu_lm.data.sources"))]
print(json.dumps({"env_set": env_set, "training_modules": training, "tokens": c.tokens,
                  "dtypes": sorted({str(x.dtype) for x in __import__("jax").tree.leaves(run.decoder.params)})}))
"""


def test_inference_loads_parameters_only_and_imports_nothing_of_training(trained_run):
  env = {k: v for k, v in os.environ.items() if k not in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
                                                          "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  env["XLA_FLAGS"] = ""
  result = subprocess.run([sys.executable, "-c", _INFERENCE_ONLY, trained_run], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["env_set"] == [], "importing tpu_lm set TPU variables"
  assert out["training_modules"] == []
  assert len(out["tokens"]) <= 4 and out["dtypes"] == ["float32"]
