"""Atomic writes: a kill or a failed write leaves the old content or the new,
never half of either, and no temporary file behind.

The one home of this for every writer: result and flag records, embeddings
and predictions, exports and imports. Imports only the standard library, so
the export package (`tf_hub_export`) uses it as it uses the model layer.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time
from typing import Callable, Optional


class WriteError(OSError):
  """A file or folder could not be written (disk full, read-only, ...).

  The message is one line naming the target, the reason and the fix; what
  was there before is left as it was and no temporary file remains.
  """


def _is_io_error(error: BaseException) -> bool:
  """An OSError, or a TensorFlow op error (an I/O failure inside
  `tf.saved_model.save` and friends; recognised without importing TF)."""
  return isinstance(error, OSError) or hasattr(error, "error_code")


def _write_error(target: str, error: BaseException) -> WriteError:
  reason = (getattr(error, "strerror", None) or getattr(error, "message", None)
            or str(error) or type(error).__name__)
  reason = str(reason).strip().splitlines()[0][:200]
  return WriteError(
      f"Could not write {target} ({reason}); nothing was changed there: free "
      "space or make the folder writable, then rerun the same command.")


def write_file(path: str, write_fn: Callable[[str], None]) -> str:
  """Calls `write_fn(tmp)` to write a temporary file, then renames it to
  `path`. On any failure the temporary file is removed and `path` keeps its
  old content."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if _is_io_error(e) and not isinstance(e, WriteError):
      raise _write_error(path, e) from e
    raise
  return path


def write_files(writers: dict) -> list:
  """Writes several files as one: `{path: write_fn}`; every `write_fn(tmp)`
  writes a temporary file first, and only when all succeeded are they
  renamed into place (renames do not fail for want of space). On any
  failure every temporary file is removed and every path keeps its old
  content; an I/O failure is raised as `WriteError`."""
  temps = {path: f"{path}.tmp-{os.getpid()}" for path in writers}
  try:
    for path, write_fn in writers.items():
      try:
        write_fn(temps[path])
      except BaseException as e:
        if _is_io_error(e) and not isinstance(e, WriteError):
          raise _write_error(path, e) from e
        raise
    for path, tmp in temps.items():
      os.replace(tmp, path)
  finally:
    for tmp in temps.values():
      if os.path.exists(tmp):
        os.remove(tmp)
  return list(writers)


def write_text(path: str, text: str) -> str:
  """Writes a small text file atomically."""
  def write(tmp):
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return write_file(path, write)


def staging_prefix(target: str) -> str:
  """Name prefix of the temporary folders beside `target`."""
  return f".{os.path.basename(target)}.tmp-"


def write_dir(target: str, write_fn: Callable[[str], None],
              replace: bool = True) -> str:
  """Calls `write_fn(staging)` to fill a temporary folder beside `target`,
  then moves it into place with renames only.

  Args:
    target: the folder to create or replace.
    write_fn: writes the folder's content into the path it is given (which
      does not exist yet).
    replace: replace an existing `target` (False: `target` must not exist
      or be empty, checked again just before the move).
  Returns:
    The absolute path of `target`.
  Raises:
    FileExistsError: `replace` is False and `target` holds files.
    WriteError: the folder could not be written (the staging folder is
      removed, `target` is left as it was).
  """
  target = os.path.abspath(target)
  parent = os.path.dirname(target)
  try:
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=staging_prefix(target), dir=parent)
  except OSError as e:
    raise _write_error(target, e) from e
  try:
    content = os.path.join(staging, "content")
    write_fn(content)
    if not replace:
      if os.path.isdir(target) and not os.listdir(target):
        os.rmdir(target)
      if os.path.exists(target):
        raise FileExistsError(f"{target} already exists")
      os.rename(content, target)
    else:
      _swap_into_place(content, target)
  except (FileExistsError, WriteError):
    raise
  except BaseException as e:
    if _is_io_error(e):
      raise _write_error(target, e) from e
    raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  remove_leftovers(target)
  return target


def _swap_into_place(staged: str, target: str) -> None:
  """Replaces `target` by `staged`: the old folder is renamed aside (one
  rename), the new one renamed in (one rename), then the old one deleted. A
  kill between the two renames leaves the old folder at `<target>.old-*`
  (`previous_version` finds it)."""
  old: Optional[str] = None
  if os.path.exists(target):
    old = f"{target}.old-{int(time.time() * 1000)}"
    os.rename(target, old)
  os.rename(staged, target)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def previous_versions(target: str) -> list:
  """Folders set aside by interrupted swaps of `target`, oldest first."""
  return sorted(glob.glob(glob.escape(target.rstrip("/")) + ".old-*"))


def remove_leftovers(target: str) -> None:
  """Deletes what killed writes of `target` left beside it (staging folders,
  an old version set aside). Only called once `target` is complete."""
  parent = os.path.dirname(os.path.abspath(target))
  pattern = os.path.join(glob.escape(parent),
                         glob.escape(staging_prefix(target)) + "*")
  for path in glob.glob(pattern) + previous_versions(os.path.abspath(target)):
    shutil.rmtree(path, ignore_errors=True)


def folder_bytes(folder: str) -> int:
  """The size of every file under `folder` (0 if it does not exist)."""
  return sum(os.path.getsize(os.path.join(d, f))
             for d, _, files in os.walk(folder) for f in files)
