"""Orbax checkpoints: train state, data position and config in one step directory.

Saves are asynchronous (training goes on while the files are written) and
atomic (Orbax writes to a temporary directory and renames it when complete), and
only the newest `keep` are kept. Items of a step directory:

- `state`: the TrainState (TensorStore arrays); inference reads `params` alone;
- `data`: the data position as JSON, `{"streams": [[epoch, block, row], ...],
  "block_docs": N}`, one triple per row of the global batch (data/stream.py),
  gathered from every process, so a run resumes on more or fewer hosts;
- `config`: the run's config as JSON.

Nothing is pickled. Only unreadable files are called damage: a checkpoint of
another model or optimizer is reported as such, naming what differs.
"""

import contextlib
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from tpu_lm import storage
from tpu_lm.errors import UserError


class Checkpointer:
  def __init__(self, directory: str, keep: int):
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    # Handlers named up front, so a checkpoint's metadata (shapes) can be read
    # before restoring it.
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state, data_iter, config_dict: dict) -> None:
    self._mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_iter.position() if hasattr(data_iter, "position")
                                   else _gathered_position(data_iter)),
            config=ocp.args.JsonSave(config_dict),
        ),
        force=True,
    )

  def restore(self, step: int, abstract_state, data_iter):
    """State restored onto `abstract_state`'s shardings; `data_iter` is set in place."""
    self.check_structure(step, abstract_state)
    with self._damage_is_user_error(step):
      restored = self._mngr.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
      )
      if hasattr(data_iter, "restore_position"):  # DP-SGD's Poisson loader: steps drawn
        data_iter.restore_position(restored["data"])
      else:
        data_iter.set_state(_position(restored["data"], data_iter))
    return restored["state"]

  def saved_item(self, step: int, name: str) -> dict:
    """A JSON item of the checkpoint at `step`: "config" (the run's config) or "data"
    (the data position, and a private run's privacy ledger)."""
    with self._damage_is_user_error(step):
      return self._mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

  def _saved_shapes(self, step: int) -> dict:
    """{'params/layers_0/...': shape} of the checkpoint's train state, from its metadata."""
    with self._damage_is_user_error(step):
      saved = self._mngr.item_metadata(step)["state"]
      if saved is None:
        raise FileNotFoundError("no readable metadata for the train state")
      return {_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}

  def check_resumable(self, step: int) -> None:
    """UserError if the checkpoint holds parameters only (written by tpu_lm.convert or
    tpu_lm.compress): a run to fine-tune from, not to resume."""
    if all(n.startswith("params/") for n in self._saved_shapes(step)):
      raise UserError(
          f"{self.directory} holds parameters only (a converted or exported run directory), not a run to"
          f" resume: train from it with --config.init_from={os.path.dirname(self.directory)} and a new --workdir."
      )

  def check_structure(self, step: int, abstract_state) -> None:
    """UserError naming the first array whose saved path or shape differs from the config's."""
    self.check_resumable(step)
    saved = self._saved_shapes(step)
    wanted = {_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
    for name in list(wanted) + [n for n in saved if n not in wanted]:
      got, want = saved.get(name), wanted.get(name)
      if got == want:
        continue
      there = "is missing" if got is None else f"has shape {got}"
      here = "is not in this config" if want is None else f"has shape {want} in this config"
      where = f"the checkpoint at step {step} in {self.directory}"
      if name.startswith("params/"):
        raise UserError(
            f"{where} is of another model: {name} {there} there but {here}; resume with the config it"
            " was trained with, or use a new --workdir."
        )
      if name.startswith("opt_state/"):
        raise UserError(
            f"{where} holds another optimizer's state: {name} {there} there but {here} (optim.optimizer"
            " or its settings changed); resume with the optimizer it was trained with, or use a new --workdir."
        )
      raise UserError(
          f"{where} was written by another version of tpu_lm: {name} {there} there but {here};"
          " train it on with that version, or use a new --workdir."
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

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _gathered_position(data_iter) -> dict:
  """Every row's stream state, from all processes (each holds its own rows')."""
  local = np.asarray(data_iter.get_state(), np.int64)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    local = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 3)
  return {"streams": local.tolist(), "block_docs": data_iter.block_docs}


def _position(saved, data_iter) -> np.ndarray:
  """The saved stream states, checked against this run's global batch."""
  if isinstance(saved, dict) and "poisson_steps_drawn" in saved:
    raise UserError("the checkpoint was written by a run with privacy.dp=True (Poisson-sampled batches): resume it"
                    " with --config.privacy.dp=True, or start this run in a new --workdir.")
  streams = np.asarray(saved.get("streams") if isinstance(saved, dict) else None, np.int64)
  rows = data_iter.streams[0].num_shards
  if streams.shape != (rows, 3):
    raise UserError(
        f"the checkpoint's data position has {streams.shape[0] if streams.ndim else 0} row streams, this run's"
        f" global batch {rows}: resume with the data.global_batch_size it was trained with, or use a new --workdir.")
  block_docs = saved.get("block_docs", data_iter.block_docs)
  if block_docs != data_iter.block_docs:  # a stream's (epoch, block, row) means another row under another size
    raise UserError(
        f"the checkpoint was trained with data.shuffle_block_docs={block_docs}, this run has"
        f" {data_iter.block_docs}: resume with --config.data.shuffle_block_docs={block_docs}, or use a new --workdir.")
  return streams


def _name(path) -> str:
  """A tree path as 'params/layers_0/mlp/down/kernel', whatever the container types."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def abstract_like(state, shardings):
  """ShapeDtypeStructs with shardings: what `restore` places arrays onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def check_writable(workdir: str) -> None:
  try:
    storage.makedirs(workdir)
    probe = os.path.join(workdir, f".write_probe{os.getpid()}")
    with storage.open(probe, "w"):
      pass
    storage.remove(probe)
  except OSError as e:
    raise UserError(f"cannot write to workdir {workdir} ({e.strerror}): pass a writable --workdir.") from None
