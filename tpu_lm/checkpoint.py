"""Orbax checkpoints: train state, data iterator and config in one step directory.

Saves are asynchronous (training goes on while the files are written) and
atomic (Orbax writes to a temporary directory and renames it when complete), and
only the newest `keep` are kept. The data iterator is saved through Grain's own
Orbax handler; the config as JSON. Nothing is pickled.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp

from tpu_lm.errors import UserError


class Checkpointer:
  def __init__(self, directory: str, keep: int, *, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only:  # inference: never create, save or delete anything
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
          enable_async_checkpointing=False,
      )
    else:
      options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config")
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state, data_iter, config_dict: dict) -> None:
    self._mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config_dict),
        ),
        force=True,
    )

  def restore(self, step: int, abstract_state, data_iter):
    """State restored onto `abstract_state`'s shardings; `data_iter` is set in place."""
    restored = self._mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iter),
        ),
    )
    return restored["state"]

  def restore_config(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_state(self, step: int, abstract_state):
    """The train state alone (for inference: no data iterator needed)."""
    restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs with shardings: what `restore` places arrays onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def check_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise UserError(f"cannot write to workdir {workdir} ({e.strerror}): pass a writable --workdir.") from None
