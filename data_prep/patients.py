"""Patient ids from a metadata file or file names, and the provenance audit file names make possible.

The Kaggle set's file names follow the Kermany/Mooney paediatric chest X-ray set:
class 0 `IM-0553-0001.jpeg` / `NORMAL2-IM-0123-0001.jpeg`, class 1
`person123_bacteria_456.jpeg` / `person45_virus_78.jpeg`. The id is what a split
must keep together; the pattern is evidence of where the images came from.
Collections named by UID give the id in a metadata file instead (data_prep.metadata).
A file whose patient is unknown is its own group, id `file:PATH`.
"""

import collections
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_NORMAL = re.compile(r'^(?P<patient>(?:NORMAL2-)?IM-\d+)-\d+$', re.IGNORECASE)
_PNEUMONIA = re.compile(r'^(?P<patient>person\d+)_(?:bacteria|virus)_\d+$', re.IGNORECASE)


def _stem(filename: str) -> str:
  name = filename.replace('\\', '/').rsplit('/', 1)[-1]
  return name.rsplit('.', 1)[0] if '.' in name else name


def patient_id(filename: str) -> str | None:
  """'person12_virus_3.jpeg' -> 'person12'; 'NORMAL2-IM-0123-0001.jpeg' -> 'NORMAL2-IM-0123'; else None."""
  stem = _stem(filename)
  for pattern in (_NORMAL, _PNEUMONIA):
    match = pattern.match(stem)
    if match:
      return match.group('patient')
  return None


def is_paediatric_pneumonia_name(filename: str) -> bool:
  """True for the Kermany pneumonia pattern (personN_bacteria_M / personN_virus_M)."""
  return _PNEUMONIA.match(_stem(filename)) is not None


def is_paediatric_normal_name(filename: str) -> bool:
  """True for the Kermany normal pattern (IM-NNNN-NNNN / NORMAL2-IM-NNNN-NNNN)."""
  return _NORMAL.match(_stem(filename)) is not None


def assign(paths: Sequence[str], listed: Mapping[str, str] | None = None) -> tuple[list[str], list[str], list[str]]:
  """Each file's patient id and its source ('metadata', 'file name' or 'own group'), and warnings.

  With `listed` (path -> id from a metadata file) only the file counts: unlisted files, which the metadata
  step has already warned about, are their own group. Without it the id comes from the file name.
  """
  ids, sources = [], []
  for path in paths:
    pid, source = (listed.get(path), 'metadata') if listed is not None else (patient_id(path), 'file name')
    ids.append(f'file:{path}' if pid is None else pid)
    sources.append('own group' if pid is None else source)
  unparsed = [path for path, source in zip(paths, sources) if source == 'own group']
  warnings = []
  if listed is None and unparsed:
    warnings.append(f'{len(unparsed)} file names match no known patient-id pattern; each is its own patient group '
                    f'(e.g. {unparsed[0]})')
  return ids, sources, warnings


def across_splits(ids: Sequence[str], splits: Sequence[str]) -> list[str]:
  """The patient ids (sorted) whose images lie in more than one split."""
  seen: dict[str, set[str]] = collections.defaultdict(set)
  for pid, name in zip(ids, splits):
    seen[pid].add(name)
  return sorted(pid for pid, names in seen.items() if len(names) > 1)


def summary(examples: Iterable[Mapping[str, Any]], metadata_file: str | None = None) -> str:
  """'patients: 123 (118 from metadata.csv, 5 own groups)': how many, and where their ids came from."""
  per_source = collections.Counter(source for source, _ in {(e['patient_source'], e['patient_id']) for e in examples})
  names = {'metadata': f'from {metadata_file}', 'file name': 'from file names', 'own group': 'own group'}
  parts = []
  for source, n in per_source.most_common():
    name = names.get(source, f'from {source}')
    parts.append(f'{n} {name}s' if source == 'own group' and n > 1 else f'{n} {name}')
  return f'patients: {per_source.total()} ({", ".join(parts)})'
