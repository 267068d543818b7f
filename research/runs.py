"""Workdirs: the lock that keeps two processes from training in one, and the config.json that a
failed attempt leaves as it was.

A run holds `<workdir>/.lock` (an flock on a file naming its host and pid) while it trains; a
second process on the same workdir is refused in one line naming the holder. The kernel drops an
flock when its process dies, however it dies, so a lock left by a killed run is taken over (and
said so). Multi-host runs: process 0 holds it. Read-only modes (generate, chat, ...) take none.
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from typing import Iterator

import jax

from research.errors import UserError

LOCK = '.lock'


def check_writable(workdir: str) -> None:
  """Raises UserError unless `workdir` is, or can be made, a writable folder."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir={workdir} is a file, not a folder; give a folder path.')
  parent = workdir
  while not os.path.exists(parent):
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UserError(f'--workdir={workdir} cannot be written ({parent} is read-only for this '
                    'user); give a writable folder.')


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock (process 0 only) for the body; raises UserError when another live
  process holds it."""
  if jax.process_index() != 0:
    yield
    return
  check_writable(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    with os.fdopen(os.dup(fd)) as f:
      previous = f.read().strip()
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = json.loads(previous) if previous.startswith('{') else {}
      raise UserError(f'{workdir} is in use by process {holder.get("pid", "?")} on '
                      f'{holder.get("host", "?")} (since {holder.get("since", "?")}); wait for it '
                      f'to finish or stop it, or use another --workdir.') from None
    if previous:
      print(f'note: taking over the lock of a run that ended without releasing it ({previous})',
            flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                              'since': time.strftime('%Y-%m-%d %H:%M:%S')}).encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # An empty lock file: released cleanly.
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


@contextlib.contextmanager
def config_kept_on_failure(workdir: str) -> Iterator[None]:
  """Restores `workdir/config.json` (or removes it, if there was none) when the body fails
  before saving a checkpoint: an attempt that trained nothing leaves the record of the run that
  did (process 0 only)."""
  path = os.path.join(workdir, 'config.json')
  previous = _read(path)

  def checkpoints() -> set[str]:
    directory = os.path.join(workdir, 'checkpoints')
    return set(os.listdir(directory)) if os.path.isdir(directory) else set()

  before = checkpoints()
  try:
    yield
  except BaseException:
    if jax.process_index() == 0 and checkpoints() <= before:
      if previous is None:
        if os.path.exists(path):
          os.remove(path)
      elif _read(path) != previous:
        with open(path + '.tmp', 'wb') as f:
          f.write(previous)
        os.replace(path + '.tmp', path)
    raise


def _read(path: str) -> bytes | None:
  if not os.path.exists(path):
    return None
  with open(path, 'rb') as f:
    return f.read()
