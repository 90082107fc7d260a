"""Orbax checkpoints: train state, data iterator and config in one step directory.

Saves are asynchronous (training goes on while the files are written) and
atomic (Orbax writes to a temporary directory and renames it when complete), and
only the newest `keep` are kept. The data iterator is saved through Grain's own
Orbax handler; the config as JSON. Nothing is pickled.
"""

import contextlib
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
    # Handlers named up front, so a checkpoint's metadata (shapes) can be read
    # before restoring it.
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()},
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
    self.check_shapes(step, abstract_state)
    with self._damage_is_user_error(step):
      restored = self._mngr.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(data_iter),
          ),
      )
    return restored["state"]

  def check_shapes(self, step: int, abstract_state) -> None:
    """UserError naming the first parameter whose saved shape differs from the config's."""
    with self._damage_is_user_error(step):
      saved = self._mngr.item_metadata(step)["state"]
      if saved is None:
        raise FileNotFoundError("no readable metadata for the train state")
      saved_params = {_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(saved["params"])}
    for path, want in jax.tree_util.tree_leaves_with_path(abstract_state.params):
      name = _name(path)
      got = saved_params.get(name)
      if got is None or tuple(got.shape) != tuple(want.shape):
        there = "is missing" if got is None else f"has shape {tuple(got.shape)}"
        raise UserError(
            f"the checkpoint at step {step} in {self.directory} is of another model: params/{name} {there}"
            f" there but has shape {tuple(want.shape)} in this config; resume with the config it was"
            " trained with, or use a new --workdir."
        )

  @contextlib.contextmanager
  def _damage_is_user_error(self, step: int):
    try:
      yield
    except UserError:
      raise
    except Exception as e:  # Orbax/TensorStore raise many types for missing or cut files
      older = [s for s in self.all_steps() if s < step]
      fallback = f"resume from step {max(older)}" if older else "start from scratch"
      detail = (str(e).strip().splitlines() or [""])[0][:200]
      raise UserError(
          f"the checkpoint at step {step} in {self.directory} could not be read ({type(e).__name__}:"
          f" {detail}); it is damaged or incomplete: move {self.directory}/{step} aside to {fallback},"
          " or put back an intact copy."
      ) from None

  def restore_config(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore_state(self, step: int, abstract_state):
    """The train state alone (for inference: no data iterator needed)."""
    self.check_shapes(step, abstract_state)
    with self._damage_is_user_error(step):
      restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _name(path) -> str:
  """A tree path as 'layers_0/mlp/down/kernel', whatever the container types."""
  parts = []
  for k in path:
    parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
  return "/".join(parts)


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
