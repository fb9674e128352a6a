"""Patient ids from file names, and the provenance audit they make possible.

The Kaggle set's file names follow the Kermany/Mooney paediatric chest X-ray set:
class 0 `IM-0553-0001.jpeg` / `NORMAL2-IM-0123-0001.jpeg`, class 1
`person123_bacteria_456.jpeg` / `person45_virus_78.jpeg`. The id is what a split
must keep together; the pattern is evidence of where the images came from.
"""

import re

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
