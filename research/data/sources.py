"""Where text comes from: the embedded stdlib corpus, text files, folders of them, or JSONL.

Every source becomes a list of `Document`s, split into train and val deterministically.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
import zlib

from research.errors import UserError

EXCLUDED_DIRS = frozenset({'test', 'tests', 'idle_test', 'site-packages', '__pycache__'})


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # file path, or "path:line" for a JSONL record
  text: str


def stdlib_paths() -> list[pathlib.Path]:
  """The running interpreter's own standard-library `.py` files (no tests), sorted."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  return sorted(p for p in root.rglob('*.py')
                if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))


def _read_text(path: pathlib.Path) -> str:
  try:
    return path.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(f'{path} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 '
                    'or remove it from data.path.') from None


def _read_jsonl(path: pathlib.Path, field: str, name: str) -> list[Document]:
  """The records of a JSONL file as Documents named "name:line". Lines end at '\n' only (JSON
  strings may hold U+2028 and the like unescaped, which str.splitlines would break at)."""
  docs = []
  for i, line in enumerate(_read_text(path).split('\n'), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}:{i} is not valid JSON ({e.msg}); fix or delete that line.') from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
      raise UserError(f'{path}:{i} has no string field "{field}"; each line must be an object '
                      f'like {{"{field}": "..."}}.')
    docs.append(Document(f'{name}:{i}', record[field]))
  return docs


def check_path(path: str) -> None:
  """Raises UserError unless `path` is '' (the default corpus), a regular file or a folder (a
  device such as /dev/zero would fill memory, a FIFO would block forever)."""
  if not path:
    return
  p = pathlib.Path(os.path.expanduser(path))
  if not p.exists():
    raise UserError(f'data.path={path!r} does not exist; point --config.data.path at a text file, '
                    'a folder of text files or a .jsonl file (or leave it empty for the default).')
  if not (p.is_file() or p.is_dir()):
    raise UserError(f'data.path={path!r} is not a regular file or folder (a device, FIFO or '
                    'socket); point it at text files.')


def fingerprint(path: str) -> str:
  """What the documents of `path` were read from: the Python version for the default corpus,
  else every file's path, size and modification time (hashed). It changes when the data does."""
  if not path:
    return f'stdlib {sys.version}'
  p = pathlib.Path(os.path.expanduser(path)).resolve()
  files = sorted(f for f in p.rglob('*') if f.is_file()) if p.is_dir() else [p]
  digest = hashlib.sha1()
  for f in files:
    st = f.stat()
    digest.update(f'{f}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return f'{p} {digest.hexdigest()}'


def load_documents(path: str, text_field: str = 'text') -> list[Document]:
  """Reads `path`: '' = stdlib corpus; a `.jsonl` file; a text file; or a folder of text files.

  Folders are read recursively (hidden files skipped); each file must be UTF-8. Names are relative
  to the stdlib root or the folder (a lone file: its name), so the train/val split is the same
  wherever the data lies.
  """
  if not path:
    root = pathlib.Path(sysconfig.get_paths()['stdlib'])
    return [Document(str(f.relative_to(root)), _read_text(f)) for f in stdlib_paths()]
  check_path(path)
  p = pathlib.Path(os.path.expanduser(path))
  if p.is_dir():
    files = sorted(f for f in p.rglob('*') if f.is_file()
                   and not any(part.startswith('.') for part in f.relative_to(p).parts))
    docs = []
    for f in files:
      name = str(f.relative_to(p))
      docs += (_read_jsonl(f, text_field, name) if f.suffix == '.jsonl'
               else [Document(name, _read_text(f))])
  elif p.suffix == '.jsonl':
    docs = _read_jsonl(p, text_field, p.name)
  else:
    docs = [Document(p.name, _read_text(p))]
  docs = [d for d in docs if d.text.strip()]
  if not docs:
    raise UserError(f'data.path={path!r} holds no text (empty files or folder); add text files.')
  return docs


def split_documents(docs: list[Document], val_fraction: float
                    ) -> tuple[list[Document], list[Document]]:
  """Deterministic train/val split. With at least 10 / val_fraction documents (about 10 or more
  expected in val): whole documents, by a hash of each one's name. With fewer (a handful of files,
  where one held-out file could be half the data): the last `val_fraction` of every document is
  val, as nanoGPT does with its one file."""
  if not 0.0 < val_fraction < 1.0:
    raise UserError(f'data.val_fraction={val_fraction} must be in (0, 1).')
  if len(docs) >= 10 / val_fraction:
    in_val = [zlib.crc32(d.name.encode()) / 2**32 < val_fraction for d in docs]
    train = [d for d, v in zip(docs, in_val) if not v]
    val = [d for d, v in zip(docs, in_val) if v]
    if train and val:
      return train, val
  cuts = [int(len(d.text) * (1.0 - val_fraction)) for d in docs]
  return ([Document(d.name, d.text[:c]) for d, c in zip(docs, cuts) if c > 0],
          [Document(d.name + ':val', d.text[c:]) for d, c in zip(docs, cuts) if c < len(d.text)])
