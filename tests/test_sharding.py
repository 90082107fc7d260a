import jax
import numpy as np
import pytest

from tests.conftest import tiny_config, train_steps
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training.setup import Setup
from tpu_lm.data import pipeline
from tpu_lm.errors import UserError


def _batches(n):
  rng = np.random.default_rng(0)
  docs = [list(rng.integers(3, 259, rng.integers(5, 80))) for _ in range(60)]
  it = pipeline.train_iter(pipeline.Split.of_tokens(docs), seq_len=32, global_batch=8, seed=0)
  return [next(it) for _ in range(n)]


def _train(mesh_sizes, devices, batches, accum=1, optim=None, **model):
  config = tiny_config()
  config.model.update(model)
  config.optim.update(optim or {})
  config.mesh.update(mesh_sizes)
  config.optim.grad_accum_steps = accum
  losses, grad_norms, state, setup = train_steps(config, batches, devices)
  return losses, grad_norms, state.params, setup


@pytest.fixture(scope="module")
def one_device():
  batches = _batches(4)
  return batches, _train({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], batches)


@pytest.mark.parametrize(
    "mesh, shape",
    [
        ({"preset": "data_parallel"}, (8, 1, 1)),
        pytest.param({"preset": "fsdp"}, (1, 8, 1), marks=pytest.mark.slow),
        pytest.param({"preset": "fsdp_tensor", "tensor": 2}, (1, 4, 2), marks=pytest.mark.slow),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        # Gradient accumulation: 4 microbatches of one row per device == the batch of 8 at once.
        pytest.param({"data": 2, "fsdp": 1, "tensor": 1, "accum": 4}, (2, 1, 1), marks=pytest.mark.slow),
    ],
    ids=["data_parallel", "fsdp", "fsdp_tensor", "data_fsdp_tensor", "accumulate_4"],
)
def test_parallel_training_matches_one_device(mesh, shape, one_device):
  """Every preset, and accumulation: same losses, gradient norms and (after 4
  updates) parameters as one device taking the whole batch at once. The gradient
  norm is what shows a wrong gradient scale: AdamW and clipping absorb it."""
  assert len(jax.devices()) == 8
  batches, (ref_losses, ref_norms, ref_params, _) = one_device
  mesh = dict(mesh)
  accum = mesh.pop("accum", 1)
  devices = jax.devices()[: 2 if accum > 1 else 8]
  losses, norms, params, setup = _train(mesh, devices, batches, accum)
  assert tuple(setup.mesh.shape.values()) == shape
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)
  if shape[1] > 1:  # parameters really are split, not replicated
    emb = setup.state_shardings.params["embed"]["embedding"]
    assert emb.spec[1] == "fsdp"


@pytest.mark.slow
def test_bert_layout_trains_on_a_mesh_as_on_one_device():
  """Post-norm blocks, the normed embedding and BERT's prediction head (its dense kernel,
  norm and vocabulary bias) shard, and train as on one device."""
  batches = _batches(3)
  bert = {"norm_position": "post", "head_transform": True, "mlp": "gelu_exact", "norm_eps": 1e-12}
  ref_losses, ref_norms, ref_params, _ = _train({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], batches, **bert)
  losses, norms, params, setup = _train({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), batches, **bert)
  assert {"head_dense", "head_norm", "output_bias", "embed_norm"} <= set(params) and "final_norm" not in params
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)
  assert setup.state_shardings.params["output_bias"].spec[0] == "tensor"


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["layers", "scanned"])
def test_muon_on_sharded_matrices_equals_one_device(scan):
  """Newton-Schulz on FSDP- and tensor-sharded matrices (XLA inserts the collectives) gives
  the one-device update; scanned layers orthogonalize each layer's matrix on its own."""
  batches = _batches(3)
  optim = {"optimizer": "muon", "warmup_steps": 1}
  model = {"scan_layers": scan, "qk_norm": True}
  ref_losses, ref_norms, ref_params, _ = _train({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], batches,
                                                optim=optim, **model)
  losses, norms, params, setup = _train({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices(), batches, optim=optim,
                                        **model)
  kernel = setup.state_shardings.params["layers" if scan else "layers_0"]["mlp"]["up"]["kernel"]
  assert {"fsdp", "tensor"} <= set(kernel.spec)  # the matrix really is split both ways
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, ref_params)


def test_mesh_shape_fills_and_rejects():
  assert mesh_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(UserError, match="has 6 devices but 8"):
    mesh_lib.mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
  with pytest.raises(UserError, match="cannot fill"):
    mesh_lib.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_indivisible_parameter_names_itself():
  config = tiny_config()
  config.model.num_heads = 2  # 2 heads cannot be split over 4 tensor devices
  with pytest.raises(UserError, match="cannot be split"):
    Setup(config, mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 4}))
