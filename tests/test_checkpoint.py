import jax
import numpy as np
import pytest

from tests.conftest import tiny_config
from tpu_lm.data import pipeline
from tpu_lm.errors import UserError
from tpu_lm.parallel import mesh as mesh_lib
from tpu_lm.training import checkpoint
from tpu_lm.training.setup import Setup

STREAM = pipeline.Split.of_tokens([list(range(3, 100 + i)) for i in range(10)])


def _setup(mesh_sizes, config=None):
  config = config or tiny_config()
  return config, Setup(config, mesh_lib.make_mesh(mesh_sizes))


def _saved(directory, setup, config, steps: int):
  """Trains `steps` steps (real optimizer state, not zeros) and saves; returns
  (checkpointer, state, data iterator)."""
  it = pipeline.train_iter(STREAM, seq_len=32, global_batch=8, seed=0)
  with setup.context():
    state = setup.init(jax.random.key(0))
    for _ in range(steps):
      state, _ = setup.train_step(state, setup.device_batch(next(it)))
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  ckpt.save(steps, state, it, config.to_dict())
  return ckpt, state, it


def test_checkpoint_round_trips_exactly_onto_another_mesh(tmp_path):
  config, setup = _setup({"data": 8, "fsdp": 1, "tensor": 1})
  ckpt, state, it = _saved(str(tmp_path), setup, config, steps=2)
  ckpt.wait()
  expected_next = next(it)

  # Restore into a fresh process's view: new iterator, FSDP mesh.
  _, fsdp = _setup({"data": 2, "fsdp": 4, "tensor": 1})
  it2 = pipeline.train_iter(STREAM, seq_len=32, global_batch=8, seed=0)
  restored = checkpoint.Checkpointer(str(tmp_path), keep=2)
  assert restored.latest_step() == 2
  abstract = checkpoint.abstract_like(fsdp.abstract_state, fsdp.state_shardings)
  got = restored.restore(2, abstract, it2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, state)
  assert got.params["embed"]["embedding"].sharding == fsdp.state_shardings.params["embed"]["embedding"]
  np.testing.assert_array_equal(next(it2)["inputs"], expected_next["inputs"])
  ckpt.close()
  restored.close()


def test_another_optimizer_is_named_not_called_damage(tmp_path):
  """Only unreadable files are damage: a checkpoint of another optimizer says so."""
  config, setup = _setup({"data": 8, "fsdp": 1, "tensor": 1})
  _saved(str(tmp_path), setup, config, steps=0)[0].close()
  config.optim.optimizer = "sgd"
  _, sgd = _setup({"data": 8, "fsdp": 1, "tensor": 1}, config)
  with pytest.raises(UserError, match=r"holds another optimizer's state: opt_state/1/\S+ is missing there .* \(optim.optimizer or"):
    checkpoint.Checkpointer(str(tmp_path), keep=2).check_structure(0, sgd.abstract_state)
