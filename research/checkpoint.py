"""Orbax checkpoints: save every N steps, keep the last few, restore the newest that is intact.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint usable. Each save also records two checksums per array
(sums of its bits, plain and position-weighted, computed on the devices) in
<directory>.checksums.json;
a restore that fails, or whose arrays do not match their checksums (a damaged file), is reported
in one line and the next older step is tried (`restore_newest`). Damaged steps are moved aside
into <directory>_set_aside/, never deleted.
"""

import json
import os
import shutil
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from research.errors import UserError



class Corrupt(Exception):
  """A checkpoint step that cannot be read back as it was saved."""


@jax.jit
def checksums(tree: Any) -> list[jax.Array]:
  """Per leaf of `tree`: uint32 [2], the sum of its elements' bits and of its bits times their
  position (mod 65521, plus 1), both modulo 2^32. Any changed, lost or moved value changes them
  (but for a 2^-32 chance)."""
  def leaf(x):
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, unsigned).ravel().astype(jnp.uint32)
    weight = jnp.arange(bits.size, dtype=jnp.uint32) % 65521 + 1
    return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weight).sum(dtype=jnp.uint32)])
  return [leaf(x) for x in jax.tree.leaves(tree)]


def describe(error: BaseException) -> str:
  """The first line of an exception's message (at most 160 characters), or its type."""
  text = str(error).strip()
  return (text.splitlines()[0][:160] if text else '') or type(error).__name__


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
    """Saves `state` as `step` in the background; `wait()` blocks until it is on disk. Its
    checksums are recorded first (process 0 writes them)."""
    sums = [np.asarray(x).tolist() for x in jax.device_get(checksums(state))]
    if jax.process_index() == 0:
      table = {k: v for k, v in self._checksums().items()
               if os.path.isdir(os.path.join(self.directory, k))}
      table[str(step)] = sums
      with open(self.directory + '.checksums.json.tmp', 'w') as f:
        json.dump(table, f)
      os.replace(self.directory + '.checksums.json.tmp', self.directory + '.checksums.json')
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def _checksums(self) -> dict[str, list]:
    path = self.directory + '.checksums.json'
    if not os.path.exists(path):
      return {}
    try:
      with open(path) as f:
        return json.load(f)
    except ValueError:
      return {}  # A damaged table: the restores go unchecked (and finite-checked by the loop).

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, target: Any) -> Any:
    """Restores `step` with the structure, shapes, dtypes and shardings of `target`.

    `target` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), so a
    checkpoint saved on one mesh restores onto another.
    Raises UserError when the saved tree does not fit `target` (another config), `Corrupt` when
    the step cannot be read or its arrays do not match their recorded checksums.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    fits, why = _fits(self.saved_tree(step), abstract)
    if not fits:
      raise UserError(f'the checkpoint at {self.directory} (step {step}) does not fit this '
                      f'config ({why}); use a fresh --workdir or the config it was trained with.')
    try:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except
      raise Corrupt(f'it does not load: {describe(e)}') from None
    want = self._checksums().get(str(step))
    if want is not None:
      got = [np.asarray(x).tolist() for x in jax.device_get(checksums(restored))]
      bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
      if bad or len(got) != len(want):
        path = jax.tree_util.keystr(jax.tree_util.tree_leaves_with_path(restored)[bad[0]][0]
                                    ) if bad else ''
        raise Corrupt(f'{len(bad) or "some"} arrays differ from their checksums (first: '
                      f'{path}): a damaged file')
    return restored

  def restore_newest(self, restore: Callable[[int], Any], up_to: Optional[int] = None,
                     what: str = 'resuming') -> tuple[Optional[int], Any]:
    """(step, restore(step)) of the newest step (<= up_to) that restores intact; (None, None)
    when there is no step. Each newer step that is damaged (`Corrupt`), and with `up_to` each
    newer step, is moved into <directory>_set_aside/ with a one-line note, so later saves never
    meet it. Raises UserError naming the folder when steps exist but none restores."""
    steps = [s for s in self.steps() if up_to is None or s <= up_to]
    if up_to is not None and up_to not in steps:
      raise UserError(f'train.resume_step={up_to}: {self.directory} holds no checkpoint of that '
                      f'step (it holds {self.steps() or "none"}); pick one of them.')
    failures = []
    for step in reversed(steps):
      try:
        state = restore(step)
      except Corrupt as e:
        failures.append((step, str(e)))
        print(f'warning: the checkpoint at step {step} is damaged ({e}); trying an older one',
              flush=True)
        continue
      newer = [s for s in self.steps() if s > step]
      for s in newer:
        reason = dict(failures).get(s, f'newer than train.resume_step={up_to}')
        self._set_aside(s, reason)
      if newer:
        self.manager.reload()
      return step, state
    if failures:
      raise UserError(f'no checkpoint in {self.directory} loads (steps '
                      f'{", ".join(str(s) for s, _ in failures)}; step {failures[0][0]}: '
                      f'{failures[0][1]}); nothing was changed there: move the folder away to '
                      'start over, or restore it from a copy.')
    return None, None

  def _set_aside(self, step: int, reason: str) -> None:
    """Moves step `step`'s folder into <directory>_set_aside/ (process 0)."""
    target = os.path.join(self.directory + '_set_aside', str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.rmtree(target + '.old', ignore_errors=True)
      if os.path.exists(target):
        os.replace(target, target + '.old')
      shutil.move(os.path.join(self.directory, str(step)), target)
    print(f'note: moved the checkpoint at step {step} ({reason}) to {target}', flush=True)

  def saved_tree(self, step: int) -> Any:
    """The structure of the tree saved at `step` (nested dicts of array metadata; no arrays are
    read). Raises `Corrupt` when it cannot be read."""
    try:
      tree = self.manager.item_metadata(step)
    except Exception as e:  # pylint: disable=broad-except (Orbax raises many kinds)
      raise Corrupt(f'its metadata does not load: {describe(e)}') from None
    if tree is None or not jax.tree.leaves(tree):
      raise Corrupt('its metadata is missing')
    return tree

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _fits(saved: Any, abstract: Any) -> tuple[bool, str]:
  """Whether a saved tree's metadata (nested dicts of array metadata) has the leaves and shapes
  of `abstract`, and if not, the first difference."""
  def shapes(tree):
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))
    return {_path(p): tuple(x.shape) for p, x in leaves}
  have, want = shapes(saved), shapes(abstract)
  for path, shape in want.items():
    if path not in have:
      return False, f'it has no {path}'
    if have[path] != shape:
      return False, f'{path} is {have[path]} there, {shape} here'
  extra = sorted(set(have) - set(want))
  return (False, f'it has {extra[0]}, which this config lacks') if extra else (True, '')


def _path(path: tuple) -> str:
  """A key path as 'a/b/c', whatever the containers (dicts, dataclasses, named tuples)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)
