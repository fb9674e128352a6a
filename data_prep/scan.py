"""Source folder -> candidate images, and a rejection with its reason for everything else.

Every file and folder under the source ends up as a candidate or a rejection; nothing vanishes,
and nothing but a regular file is ever opened:
- hidden and system files, and the files of hidden or system folders, are rejected;
- a folder that cannot be listed is rejected by its own path ('unreadable folder: ...');
- FIFOs, sockets and devices are rejected unopened ('not a regular file (FIFO)'): reading a FIFO
  blocks for ever;
- symbolic links: a class folder that is a link to a folder is followed, since it is the root of
  its class (`ln -s /big/disk/covid 1`). Below it, a link to a regular file is read as that file,
  under the link's path (folders of links pick a subset without copying; a file reached twice is
  an exact duplicate, kept in one split). A link to a folder is rejected by its own path and not
  followed: it could loop or count a tree twice. A broken link is rejected;
- a name that is not valid UTF-8 is rejected, its path shown with backslash escapes: paths are
  stored as UTF-8 text in the manifest and the TFRecords.
Empty folders need no entry. Results are sorted by path, whatever the listing order.
Without a label map (labels come from a metadata file) there are no class folders: every image
file at any depth is a candidate.
"""

import collections
import os
import stat
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from data_prep import images

_SYSTEM_FILES = {'thumbs.db', 'desktop.ini', '.ds_store'}
_SYSTEM_DIRS = {'__macosx'}
_FILE_TYPES = {stat.S_IFIFO: 'FIFO', stat.S_IFSOCK: 'socket', stat.S_IFCHR: 'character device',
               stat.S_IFBLK: 'block device'}


class BuildError(Exception):
  """A problem with the input that stops the build; the message names the file or folder."""


def scan(source_dir: Path,
         label_map: Mapping[str, int] | None) -> tuple[list[tuple[str, int | None]], list[dict]]:
  """Sorted (relative path, label) candidates, and rejections for everything else under source_dir.

  With label_map None every image file is a candidate, its label None (the metadata file gives it).
  """
  if not source_dir.is_dir():
    raise BuildError(f'source directory {source_dir} does not exist')
  folders = label_map or {}
  for folder in folders:
    path = source_dir / folder
    if path.is_symlink() and not path.is_dir():
      raise BuildError(f'class folder {path} is a symbolic link to {_printable(os.readlink(path))}, '
                       'which is not a folder')
    if not path.is_dir():
      raise BuildError(f'class folder {path} is missing (expected folders: {", ".join(label_map)})')
  candidates, rejected = [], []
  files_per_folder = collections.Counter()
  for parts, problem in _walk(source_dir, (), folders):
    rel = '/'.join(parts)
    if problem and (not parts or (len(parts) == 1 and parts[0] in folders)):
      raise BuildError(f'{"class folder" if parts else "source directory"} {source_dir / rel}: {problem}')
    in_class = label_map is None or (len(parts) > 1 and parts[0] in label_map)
    if any(p.startswith('.') or p.lower() in _SYSTEM_DIRS for p in parts) or parts[-1].lower() in _SYSTEM_FILES:
      rejected.append({'path': rel, 'reason': 'hidden or system file'})
      continue
    if in_class:
      files_per_folder[parts[0]] += 1
    suffix = Path(parts[-1]).suffix
    if problem:
      rejected.append({'path': rel, 'reason': problem})
    elif not in_class:
      rejected.append({'path': rel, 'reason': f'not inside a class folder ({", ".join(sorted(label_map))})'})
    elif suffix.lower() not in images.IMAGE_EXTENSIONS:
      rejected.append({'path': rel, 'reason': f'not an image file extension ({suffix or "none"})'})
    else:
      candidates.append((rel, None if label_map is None else label_map[parts[0]]))
  for folder in folders:
    if not files_per_folder[folder]:
      raise BuildError(f'class folder {source_dir / folder} is empty')
  if label_map is None and not candidates:
    raise BuildError(f'source directory {source_dir} holds no image file ({", ".join(images.IMAGE_EXTENSIONS)})')
  return sorted(candidates), sorted(rejected, key=lambda r: r['path'])


def _walk(folder: Path, parts: tuple[str, ...],
          follow: Collection[str]) -> Iterator[tuple[tuple[str, ...], str | None]]:
  """(path parts, problem or None) for each entry below folder that is not a usable folder.

  Folders are entered, except links to them (those named in `follow` excepted); what cannot be
  listed, or is not a regular file, comes with the problem that is its rejection reason.
  """
  try:
    with os.scandir(folder) as listing:
      entries = list(listing)
  except OSError as e:
    yield parts, f'unreadable folder: {e.strerror or e}'
    return
  for entry in entries:
    name = _printable(entry.name)
    if name != entry.name:
      yield (*parts, name), 'name is not valid UTF-8; rename it'
      continue
    try:
      if entry.is_dir(follow_symlinks=entry.name in follow):
        yield from _walk(folder / entry.name, (*parts, entry.name), ())
      elif entry.is_symlink():
        yield (*parts, entry.name), _link_problem(Path(entry.path))
      else:
        yield (*parts, entry.name), _type_problem(entry.stat(follow_symlinks=False).st_mode)
    except OSError as e:
      yield (*parts, entry.name), f'unreadable: {e.strerror or e}'


def _link_problem(link: Path) -> str | None:
  """None for a link to a regular file (read as that file), else why the link is rejected."""
  target = _printable(os.readlink(link))
  try:
    mode = link.stat().st_mode
  except OSError as e:
    return f'symbolic link to {target} cannot be followed: {e.strerror or e}'
  if stat.S_ISDIR(mode):
    return f'symbolic link to folder {target}: not followed (move the folder in, or link a whole class folder)'
  return _type_problem(mode)


def _type_problem(mode: int) -> str | None:
  """None for a regular file; the rejection reason for a FIFO, socket or device, which is never opened."""
  if stat.S_ISREG(mode):
    return None
  return f'not a regular file ({_FILE_TYPES.get(stat.S_IFMT(mode), "unknown type")})'


def _printable(name: str) -> str:
  """The name as valid UTF-8 text: bytes that are not UTF-8 become backslash escapes."""
  return os.fsencode(name).decode('utf-8', 'backslashreplace')
