"""Patient ids, and optionally labels, from a metadata CSV that names each image.

Public COVID collections (covid-chestxray-dataset, the COVIDx sources) name images by UID or case
number; the patient, and often the finding, is only in a metadata.csv. Without it one patient's
images land in different splits. A row names a file by its path relative to --source_dir or by its
base name; every row that names a file must agree on its patient and label. An image without a row
is rejected, or with --allow_unlisted kept as its own patient group. Everything is checked before
any image is decoded.
"""

import collections
import csv
import dataclasses
import hashlib
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from data_prep.scan import BuildError

ROLES = ('path', 'patient', 'label')
_EXAMPLES = 3  # Paths or rows a warning shows.


@dataclasses.dataclass(frozen=True)
class Row:
  """One CSV row as the build reads it: its line, the file it names, the patient id, the label value or None."""

  line: int
  path: str
  patient: str
  label: str | None


@dataclasses.dataclass(frozen=True)
class Table:
  """A metadata CSV and how the build uses it: which column plays which role, what each label value means."""

  file: Path
  sha256: str
  columns: Mapping[str, str]  # Role (path, patient, label) -> column name.
  label_values: Mapping[str, int] | None  # Label value -> 0 or 1; None when labels come from class folders.
  allow_unlisted: bool
  rows: Sequence[Row]

  @property
  def labels(self) -> bool:
    """Whether labels come from this file rather than from class folders."""
    return self.label_values is not None

  def describe(self) -> dict[str, Any]:
    """The manifest's record of the file: enough to tell which metadata a build used."""
    return {'file': self.file.name, 'sha256': self.sha256, 'columns': dict(self.columns),
            'label_values': None if self.label_values is None else dict(self.label_values),
            'allow_unlisted': self.allow_unlisted}


@dataclasses.dataclass
class Matched:
  """What the table says of the scanned candidates: those kept with their labels, patient ids, rejections."""

  candidates: list[tuple[str, int]]
  patients: dict[str, str]  # Path -> patient id, for the kept files that have a row.
  rejected: list[dict[str, str]]
  warnings: list[str]


def parse_columns(text: str) -> dict[str, str]:
  """'path=imagename,patient=patientid,label=finding' -> {'path': 'imagename', ...}; path= and patient= are needed."""
  columns = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    role, _, column = (side.strip() for side in item.partition('='))
    if role not in ROLES or not column:
      raise BuildError(f'--metadata_columns entry {item!r} is not ROLE=COLUMN with ROLE one of {", ".join(ROLES)}')
    if role in columns:
      raise BuildError(f'--metadata_columns gives {role}= twice')
    columns[role] = column
  missing = [f'{role}=' for role in ROLES[:2] if role not in columns]
  if missing:
    raise BuildError(f'--metadata_columns {text!r} lacks {" and ".join(missing)}: it needs the columns of the '
                     'image file name and of the patient id, e.g. path=imagename,patient=patientid')
  return columns


def parse_label_values(text: str) -> dict[str, int]:
  """'COVID-19=1,No finding=0' -> {'COVID-19': 1, 'No finding': 0}: each value of the label column, named once."""
  values = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    value, equals, label = item.rpartition('=')
    value = value.strip()
    if not equals or label.strip() not in ('0', '1'):
      raise BuildError(f'--label_values entry {item!r} is not VALUE=0 or VALUE=1')
    if not value:
      raise BuildError(f'--label_values entry {item!r} has an empty value')
    if value in values:
      raise BuildError(f'--label_values names {value!r} twice')
    values[value] = int(label)
  if set(values.values()) != {0, 1}:
    raise BuildError(f'--label_values {text!r} must map at least one value to each of 0 and 1')
  return values


def from_flags(file: str | None, columns: str | None, label_values: str | None, allow_unlisted: bool,
               label_map_given: bool) -> Table | None:
  """The table that --metadata and its companion flags describe, or None without --metadata.

  Refuses flags that do not fit together, naming them: labels come from class folders (--label_map) or from
  a label= column with --label_values, never both; an unlisted image has no label when labels come from the file.
  """
  if file is None:
    given = [f'--{name}' for name, value in (('metadata_columns', columns), ('label_values', label_values),
                                             ('allow_unlisted', allow_unlisted)) if value]
    if given:
      raise BuildError(f'{" and ".join(given)} given without --metadata FILE.csv')
    return None
  if not columns:
    raise BuildError('--metadata needs --metadata_columns path=COLUMN,patient=COLUMN[,label=COLUMN]')
  roles = parse_columns(columns)
  values = None
  if 'label' in roles:
    if label_map_given:
      raise BuildError('--label_map and label= in --metadata_columns both say where labels come from: class '
                       'folders or the metadata file; give one')
    if allow_unlisted:
      raise BuildError('--allow_unlisted cannot keep an image without a row when label= in --metadata_columns '
                       'takes labels from the file: it would have no label')
    if not label_values:
      raise BuildError("label= in --metadata_columns needs --label_values, e.g. 'COVID-19=1,No finding=0'")
    values = parse_label_values(label_values)
  elif label_values:
    raise BuildError('--label_values needs label=COLUMN in --metadata_columns')
  return load(Path(file), roles, values, allow_unlisted)


def load(file: Path, columns: Mapping[str, str], label_values: Mapping[str, int] | None = None,
         allow_unlisted: bool = False) -> Table:
  """Reads the CSV (UTF-8, with or without Excel's byte-order mark) and checks it has the named columns."""
  try:
    data = file.read_bytes()
  except FileNotFoundError:
    raise BuildError(f'--metadata {file} does not exist') from None
  except OSError as e:
    raise BuildError(f'--metadata {file} cannot be read: {e.strerror or e}') from None
  try:
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b'\n') + 1
    raise BuildError(f'--metadata {file} is not UTF-8 text (line {line} holds byte {data[e.start:e.start + 1]!r}); '
                     'save it as UTF-8 (Excel: "CSV UTF-8")') from None
  reader = csv.reader(io.StringIO(text, newline=''))
  try:
    header = [name.strip() for name in next(reader, [])]
    for role, column in columns.items():
      if column not in header:
        raise BuildError(f'--metadata {file} has no column {column!r} ({role}= in --metadata_columns); its columns: '
                         f'{", ".join(header) or "none"}')
      if header.count(column) > 1:
        raise BuildError(f'--metadata {file} has two columns named {column!r} ({role}= in --metadata_columns)')
    index = {role: header.index(column) for role, column in columns.items()}
    rows = []
    for fields in reader:
      if any(field.strip() for field in fields):
        value = {role: fields[i].strip() if i < len(fields) else '' for role, i in index.items()}
        rows.append(Row(reader.line_num, _normal(value['path']), value['patient'], value.get('label')))
  except csv.Error as e:
    raise BuildError(f'--metadata {file} line {reader.line_num} is not valid CSV: {e}') from None
  return Table(file, hashlib.sha256(data).hexdigest(), dict(columns),
               None if label_values is None else dict(label_values), allow_unlisted, rows)


def match(table: Table, candidates: Sequence[tuple[str, int | None]]) -> Matched:
  """Each candidate's row: its patient id, and its label when the table gives labels (else the folder's).

  Raises BuildError, before any decoding, when a row could name several files (a base name that two files
  share) or rows that name one file disagree. Images without a usable row are rejected with the reason;
  rows that name no image are a warning (metadata files list more images than one downloads).
  """
  by_path = collections.defaultdict(list)
  for row in table.rows:
    by_path[row.path].append(row)
  files_named = collections.defaultdict(list)
  for rel, _ in candidates:
    files_named[_base(rel)].append(rel)
  result = Matched([], {}, [], [])
  used, unlisted, name = set(), [], table.file.name
  for rel, label in candidates:
    rows = by_path.get(rel, []) + (by_path.get(_base(rel), []) if _base(rel) != rel else [])
    for row in rows:
      if row.path == _base(rel) and len(files_named[row.path]) > 1:
        raise BuildError(f'{name} line {row.line} names {row.path!r}, which could be any of '
                         f'{", ".join(files_named[row.path])}: give paths relative to --source_dir in its '
                         f'{table.columns["path"]!r} column')
    if len({(row.patient, row.label) for row in rows}) > 1:
      raise BuildError(f'{name} lines {", ".join(str(line) for line in sorted(row.line for row in rows))} all name '
                       f'{rel} but disagree on its patient or label')
    used.update(rows)
    if not rows:
      if table.allow_unlisted:
        result.candidates.append((rel, label))
        unlisted.append(rel)
      else:
        result.rejected.append({'path': rel, 'reason': f'no row in {name}'})
    elif not rows[0].patient:
      result.rejected.append({'path': rel, 'reason': f'empty {table.columns["patient"]} in {name} line '
                                                     f'{rows[0].line}'})
    elif table.labels and rows[0].label not in table.label_values:
      result.rejected.append({'path': rel, 'reason': f'metadata label "{rows[0].label}" is not in --label_values'})
    else:
      result.candidates.append((rel, table.label_values[rows[0].label] if table.labels else label))
      result.patients[rel] = rows[0].patient
  if unlisted:
    result.warnings.append(f'{len(unlisted)} of {len(candidates)} images have no row in {name}; each is its own '
                           f'patient group (--allow_unlisted), e.g. {", ".join(unlisted[:_EXAMPLES])}')
  unused = [row for row in table.rows if row not in used]
  if unused:
    result.warnings.append(f'{len(unused)} of {len(table.rows)} rows of {name} name no image under --source_dir '
                           '(not downloaded, or rejected before decoding), e.g. '
                           f'{", ".join(f"{row.path!r} (line {row.line})" for row in unused[:_EXAMPLES])}')
  return result


def check_labels(table: Table, labels: Sequence[int]) -> None:
  """Refuses a build whose usable images, labelled by the table, lack one of the two labels."""
  missing = min({0, 1} - set(labels), default=None)
  if missing is not None:
    values = [value for value, label in table.label_values.items() if label == missing]
    raise BuildError(f'no usable image has label {missing} (values {", ".join(map(repr, values))} of column '
                     f'{table.columns["label"]!r} in {table.file.name})')


def _normal(path: str) -> str:
  """A path as the CSV gives it -> as the scan spells it: forward slashes, no leading './'."""
  return path.replace('\\', '/').removeprefix('./')


def _base(rel: str) -> str:
  return rel.rsplit('/', 1)[-1]
