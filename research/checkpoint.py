"""Orbax checkpoints: save every N steps, keep the last few, restore the latest exactly.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint usable.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from research.errors import UserError


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` for one pytree of train state."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)  # Orbax needs absolute paths.
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())  # Lets saved_tree read a fresh directory.

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Saves `state` as `step` in the background; `wait()` blocks until it is on disk."""
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, target: Any) -> Any:
    """Restores `step` with the structure, shapes, dtypes and shardings of `target`.

    `target` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), so a
    checkpoint saved on one mesh restores onto another.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise UserError(f'the checkpoint at {self.directory} (step {step}) does not fit this '
                      f'config ({first[:200]}); use a fresh --workdir or the config it was '
                      'trained with.') from None

  def saved_tree(self, step: int) -> Any:
    """The structure of the tree saved at `step` (nested dicts of array metadata; no arrays are
    read)."""
    return self.manager.item_metadata(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
