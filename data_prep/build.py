"""Image folders -> audited, patient-level, reproducible TFRecord splits + manifest.json.

    python -m data_prep.build --source_dir DATA/DATA --data_dir OUT [--seed 0] [--image_size 224]

Every file under the source directory ends up exactly once in the manifest, as a
split example or as a rejection with its reason. Patients and duplicate groups
never cross splits, unless `--group_by image` reproduces the study's image-level
split, which leaks them (the summary and the manifest say so). The output appears
atomically: an interrupted build leaves only a hidden temporary directory beside OUT.
"""

import collections
import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from covid_jax import runtime
from data_prep import bounded, duplicates, images, metadata, patients, split
from data_prep.scan import BuildError, scan

with runtime.quiet_tensorflow_import():  # TensorFlow's native INFO lines on import.
  import tensorflow_datasets as tfds
  from data_prep.tfds_builder import CLASS_NAMES, VERSION, CovidXray


def parse_label_map(text: str) -> dict[str, int]:
  """'NORMAL=0,COVID=1' -> {'NORMAL': 0, 'COVID': 1}: each a folder directly inside the source, named once."""
  mapping = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    folder, _, label = item.partition('=')
    if not folder:
      raise BuildError(f'--label_map entry {item!r} has an empty folder name')
    if label not in ('0', '1'):
      raise BuildError(f'--label_map entry {item!r} is not FOLDER=0 or FOLDER=1')
    if '/' in folder or folder.startswith('.'):
      raise BuildError(f'--label_map folder {folder!r} must be a folder directly inside --source_dir, not hidden')
    if folder in mapping:
      raise BuildError(f'--label_map names folder {folder!r} twice')
    mapping[folder] = int(label)
  if set(mapping.values()) != {0, 1}:
    raise BuildError(f'--label_map {text!r} must map at least one folder to each of 0 and 1')
  return mapping


def parse_fractions(text: str) -> dict[str, float]:
  """'64,16,20' or '0.64,0.16,0.2' -> {'train': .64, 'val': .16, 'test': .2}."""
  try:
    values = np.array([float(v) for v in text.split(',')])
  except ValueError:
    raise BuildError(f'--split {text!r} is not three comma-separated numbers') from None
  if len(values) != 3 or not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
    raise BuildError(f'--split {text!r} needs three positive finite numbers for train,val,test')
  fractions = dict(zip(split.SPLITS, (values / values.sum()).round(6).tolist()))
  empty = [name for name, fraction in fractions.items() if not fraction]
  if empty:  # The trainer needs all three.
    raise BuildError(f'--split {text!r} leaves {" and ".join(empty)} empty')
  return fractions


def _load(source_dir: Path, rel: str, image_size: int, keep_aspect: bool, max_pixels: int, budget: bounded.PixelBudget,
          spool: bounded.Spool) -> tuple[tuple[images.Fingerprint, str] | None, str | None]:
  """One file -> ((fingerprint, spooled PNG path), None), or (None, the reason it is rejected).

  Decodes within the budget: the file's pixels (a larger file than max_pixels is rejected unread) and the stored ones.
  """
  try:
    data = (source_dir / rel).read_bytes()
  except OSError as e:
    return None, f'unreadable: {e.strerror or e}'
  try:
    with budget.reserve(min(images.header_pixels(data), max_pixels) + image_size ** 2):
      fingerprint, png = images.prepare(data, image_size, keep_aspect, max_pixels)
  except images.Rejected as e:
    return None, str(e)
  return (fingerprint, spool.put(png)), None


def plan(source_dir: Path, label_map: Mapping[str, int] | None, fractions: Mapping[str, float], seed: int,
         image_size: int, keep_aspect: bool = False, max_pixels: int = images.DEFAULT_MAX_PIXELS,
         near_threshold: int = duplicates.DEFAULT_NEAR_THRESHOLD, workers: int | None = None,
         progress: bool = True, table: metadata.Table | None = None,
         patient_from_dicom: bool = False, group_by: str = 'patient') -> tuple[dict[str, Any], bounded.Spool]:
  """Reads, audits and splits the source folder: (manifest, examples to write per split).

  Labels come from class folders (label_map) or, with label_map None, from the metadata `table`; patient ids
  from the DICOM PatientID with `patient_from_dicom`, else from the table when given, else from file names.
  The examples' images wait resized as PNG files in the returned spool, which `write` removes (so does its garbage
  collection). Decodes run at most 2 x max_pixels pixels (source and stored) at once, however many the workers.
  `group_by` 'patient' keeps each patient and duplicate group in one split; 'image' splits images one by one.
  """
  if group_by not in split.GROUP_BY:
    raise BuildError(f'--group_by {group_by!r}: one of {split.GROUP_BY}')
  if (label_map is None) != bool(table and table.labels):
    raise ValueError('labels come from label_map or from the metadata table: exactly one of them')
  candidates, rejected = scan(source_dir, label_map)
  listed = metadata.match(table, candidates) if table else None
  if listed:
    candidates, rejected = listed.candidates, rejected + listed.rejected
  to_write = bounded.Spool(fractions)
  budget = bounded.PixelBudget(2 * max_pixels)
  try:
    with concurrent.futures.ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
      loaded = list(tqdm(pool.map(lambda c: _load(source_dir, c[0], image_size, keep_aspect, max_pixels, budget,
                                                  to_write), candidates),
                         total=len(candidates), desc='decoding', unit='img', disable=not progress, file=sys.stdout))
    kept, decoded, pngs = [], [], []
    for (rel, label), (stored, reason) in zip(candidates, loaded):
      if stored is None:
        rejected.append({'path': rel, 'reason': reason})
      else:
        kept.append((rel, label))
        decoded.append(stored[0])
        pngs.append(stored[1])
    for folder, label in (label_map or {}).items():
      if not any(rel.split('/')[0] == folder for rel, _ in kept):
        raise BuildError(f'class folder {source_dir / folder} has no usable image (all rejected)')
    if label_map is None:
      metadata.check_labels(table, [label for _, label in kept])
  except BaseException:
    to_write.close()
    raise

  if patient_from_dicom:
    ids, id_sources, warnings = _dicom_patients([rel for rel, _ in kept], [d.patient_id for d in decoded])
  else:
    ids, id_sources, warnings = patients.assign([rel for rel, _ in kept], listed.patients if listed else None)
  warnings = (listed.warnings if listed else []) + warnings + _provenance_warnings(kept)

  dup_groups = duplicates.find_duplicate_groups([d.pixel_sha256 for d in decoded],
                                                np.stack([d.perceptual_hash for d in decoded]), near_threshold)
  conflicting = [m for _, m in dup_groups if len({kept[i][1] for i in m}) > 1]
  if conflicting:
    warnings.append(f'{len(conflicting)} duplicate groups hold images of both labels (label noise), e.g. '
                    f'{[kept[i][0] for i in conflicting[0]]}')
  groups = _patient_groups(ids, dup_groups) if group_by == 'patient' else [[i] for i in range(len(kept))]
  splits = split.assign_splits(groups, [label for _, label in kept], fractions, seed)
  if group_by == 'image':
    warnings.append(_leak_warning(ids, dup_groups, splits))

  examples = [{'path': rel, 'label': label, 'split': s, 'patient_id': pid, 'patient_source': source,
               'sha256': d.file_sha256}
              for (rel, label), s, pid, source, d in zip(kept, splits, ids, id_sources, decoded)]
  for example, png in zip(examples, pngs):
    to_write[example['split']].append({**example, 'png': png})
  manifest = {
      'seed': seed,
      'split_fractions': dict(fractions),
      'group_by': group_by,
      'image_size': image_size,
      'keep_aspect': keep_aspect,
      'label_map': None if label_map is None else dict(label_map),
      'metadata': table.describe() if table else None,
      'class_names': list(CLASS_NAMES),
      'dataset_dir': f'covid_xray/{VERSION}',
      'counts': {s: {str(c): sum(e['split'] == s and e['label'] == c for e in examples) for c in (0, 1)}
                 for s in fractions},
      'examples': examples,
      'rejected': sorted(rejected, key=lambda r: r['path']),
      'duplicate_groups': [{'kind': kind, 'paths': [kept[i][0] for i in members]} for kind, members in dup_groups],
      'warnings': warnings,
  }
  return manifest, to_write


def _patient_groups(ids: Sequence[str], dup_groups: Sequence[tuple[str, list[int]]]) -> list[list[int]]:
  """Example indices grouped so that each patient, and each duplicate group with its patients, is one group."""
  groups = duplicates.UnionFind(len(ids))
  first_of_patient: dict[str, int] = {}
  for i, pid in enumerate(ids):
    groups.union(first_of_patient.setdefault(pid, i), i)
  for _, members in dup_groups:
    for i in members[1:]:
      groups.union(members[0], i)
  return groups.groups()


def _leak_warning(ids: Sequence[str], dup_groups: Sequence[tuple[str, list[int]]], splits: Sequence[str]) -> str:
  """What an image-level split leaks: patients and duplicate groups with images in more than one split."""
  patients_across = patients.across_splits(ids, splits)
  duplicates_across = sum(len({splits[i] for i in members}) > 1 for _, members in dup_groups)
  example = f' (e.g. {patients_across[0]})' if patients_across else ''
  return (f'--group_by image: the split is image-level, as in the study, and leaks patients across train/val/test: '
          f'{len(patients_across)} of {len(set(ids))} patients{example} and {duplicates_across} of {len(dup_groups)} '
          'duplicate groups have images in more than one split, so val and test scores are optimistic')


def _dicom_patients(paths: Sequence[str], stated: Sequence[str | None]) -> tuple[list[str], list[str], list[str]]:
  """As `patients.assign`, with ids from the DICOM PatientID each file states: one without is its own group."""
  ids = [f'file:{path}' if pid is None else pid for path, pid in zip(paths, stated)]
  sources = ['own group' if pid is None else 'DICOM PatientID' for pid in stated]
  missing = [path for path, pid in zip(paths, stated) if pid is None]
  warnings = [f'{len(missing)} images have no DICOM PatientID (empty, missing, or not a DICOM file); each is its '
              f'own patient group (e.g. {missing[0]})'] if missing else []
  return ids, sources, warnings


def _provenance_warnings(kept: Sequence[tuple[str, int]]) -> list[str]:
  """Says so when file names reveal the Kermany/Mooney paediatric set, in either class: a swapped map hides nothing."""
  sets = (('pneumonia set (personN_bacteria_M / personN_virus_M)', patients.is_paediatric_pneumonia_name,
           {1: ': this class is most likely paediatric bacterial/viral pneumonia, not COVID-19. Results measure '
               'pneumonia-vs-normal, not COVID detection.',
            0: ': pneumonia labelled non-COVID; is --label_map swapped?'}),
          ('NORMAL set (IM-NNNN-NNNN / NORMAL2-IM-NNNN-NNNN)', patients.is_paediatric_normal_name,
           {1: ': normal radiographs labelled COVID; is --label_map swapped?', 0: '.'}))
  warnings = []
  for label, class_name in ((1, 'COVID-class (label 1)'), (0, 'non-COVID (label 0)')):
    files = [rel for rel, file_label in kept if file_label == label]
    for name, matches, verdict in sets:
      if named := sum(map(matches, files)):
        warnings.append(f'provenance: {named} of {len(files)} {class_name} files are named like the Kermany/Mooney '
                        f'paediatric {name}{verdict[label]}')
  return warnings


def check_output_dir(data_dir: Path, overwrite: bool, source_dir: Path | None = None) -> None:
  """Refuses, before any work, an output the build could not write or must not replace.

  The output may not be, contain or lie inside the source; an existing non-empty output is replaced only
  with `overwrite`, and only if it is a previous build (it holds manifest.json): nothing else is deleted.
  """
  data_dir = data_dir.resolve()
  if source_dir is not None:
    source = source_dir.resolve()
    if data_dir == source or data_dir in source.parents or source in data_dir.parents:
      raise BuildError(f'output directory {data_dir} is, contains or lies inside the source {source}; '
                       'choose a --data_dir outside it')
  if data_dir.exists() and not data_dir.is_dir():
    raise BuildError(f'output path {data_dir} exists and is not a directory')
  if data_dir.is_dir() and any(data_dir.iterdir()):
    if not overwrite:
      raise BuildError(f'output directory {data_dir} already exists and is not empty; pass --overwrite to replace it')
    if not (data_dir / 'manifest.json').is_file():
      raise BuildError(f'output directory {data_dir} is not a previous build (no manifest.json): --overwrite '
                       'replaces only a build; choose another --data_dir or empty it yourself')


def write(manifest: Mapping[str, Any], to_write: bounded.Spool, data_dir: Path, overwrite: bool) -> None:
  """Writes the TFDS dataset and manifest.json into a temporary sibling, then renames it to data_dir.

  Removes the spool of `to_write` (the plan's resized images) however it ends.
  """
  with contextlib.closing(to_write):
    check_output_dir(data_dir, overwrite)
    data_dir = data_dir.absolute()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = data_dir.parent / f'.{data_dir.name}.incomplete-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
      _quiet_tfds()
      builder = CovidXray(examples=to_write, data_dir=str(tmp))
      with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints where it writes the temporary folder.
        builder.download_and_prepare(download_dir=str(tmp / '.downloads'), download_config=_download_config())
      shutil.rmtree(tmp / '.downloads', ignore_errors=True)
      (tmp / 'manifest.json').write_text(json.dumps(manifest, indent=1) + '\n')
      if data_dir.exists():
        old = data_dir.parent / f'.{data_dir.name}.replaced-{os.getpid()}'
        data_dir.rename(old)
        tmp.rename(data_dir)
        shutil.rmtree(old)
      else:
        tmp.rename(data_dir)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)


def _download_config() -> tfds.download.DownloadConfig:
  return tfds.download.DownloadConfig(try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)


def _quiet_tfds() -> None:
  """Our own progress bar and summary say what matters; TFDS's per-split bars and logs are noise here."""
  tfds.disable_progress_bar()
  logging.set_verbosity(logging.WARNING)


def summary(manifest: Mapping[str, Any]) -> str:
  """Human-readable summary: counts per split and label, rejects by reason, duplicates, warnings."""
  lines = ['split      non_covid(0)  covid(1)  total']
  for name, counts in manifest['counts'].items():
    lines.append(f'{name:<10} {counts["0"]:>12}  {counts["1"]:>8}  {counts["0"] + counts["1"]:>5}')
  reasons = collections.Counter(r['reason'] for r in manifest['rejected'])
  lines.append(f'rejected: {len(manifest["rejected"])}')
  lines += [f'  {n:>5}  {reason}' for reason, n in reasons.most_common()]
  kinds = collections.Counter(g['kind'] for g in manifest['duplicate_groups'])
  kept = 'kept within one split' if manifest.get('group_by', 'patient') == 'patient' else 'split image by image'
  lines.append(f'duplicate groups: {len(manifest["duplicate_groups"])} '
               f'({kinds["exact"]} exact, {kinds["near"]} near; {kept})')
  lines.append(patients.summary(manifest['examples'], (manifest['metadata'] or {}).get('file')))
  lines += [f'WARNING: {w}' for w in manifest['warnings']]
  return '\n'.join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a program so that importing this module defines none."""
  flags.DEFINE_string('source_dir', None, 'Folder with one sub-folder per class (Kaggle: DATA/DATA with 0/ and 1/).')
  flags.DEFINE_string('data_dir', None, 'Output folder for the TFRecord splits and manifest.json.')
  flags.DEFINE_integer('seed', 0, 'Seed of the split.')
  flags.DEFINE_integer('image_size', 224, 'Stored images are image_size x image_size (at least 32).')
  flags.DEFINE_bool('keep_aspect', False, 'Pad to square instead of stretching (the study stretched).')
  flags.DEFINE_string('split', '64,16,20', 'train,val,test proportions.')
  flags.DEFINE_enum('group_by', 'patient', split.GROUP_BY, 'What the split keeps whole: patient (each patient and '
                    'duplicate group in one split) or image (the study\'s image-level split, which leaks patients).')
  flags.DEFINE_string('label_map', '0=0,1=1', 'Class folder -> label (0 non-COVID, 1 COVID), e.g. NORMAL=0,COVID=1.')
  flags.DEFINE_integer('max_pixels', images.DEFAULT_MAX_PIXELS, 'Larger images are rejected as decompression bombs.')
  flags.DEFINE_integer('near_duplicate_threshold', duplicates.DEFAULT_NEAR_THRESHOLD,
                       'Max Hamming distance between 256-bit perceptual hashes of near duplicates.')
  flags.DEFINE_bool('strict', False, 'Exit non-zero (writing nothing) if any file or folder is rejected.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing data_dir.')
  flags.DEFINE_string('metadata', None, 'CSV naming each image (relative path or base name) and its patient.')
  flags.DEFINE_string('metadata_columns', None, 'path=COLUMN,patient=COLUMN[,label=COLUMN] of --metadata.')
  flags.DEFINE_string('label_values', None, "With label=: value -> label, e.g. 'COVID-19=1,No finding=0'.")
  flags.DEFINE_bool('allow_unlisted', False, 'Keep images without a row in --metadata, each its own patient.')
  flags.DEFINE_bool('patient_from_dicom', False, 'Patient id = the DICOM PatientID (.dcm files); a file without one '
                    'is its own patient.')
  flags.mark_flags_as_required(['source_dir', 'data_dir'])


def main(argv: Sequence[str]) -> int:
  del argv
  try:
    check_output_dir(Path(FLAGS.data_dir), FLAGS.overwrite, Path(FLAGS.source_dir))
    label_map, fractions = parse_label_map(FLAGS.label_map), parse_fractions(FLAGS.split)
    # Below MIN_SIDE a stored image keeps no usable detail; below MIN_SIDE**2 pixels every image is a "bomb".
    for name, least in (('image_size', images.MIN_SIDE), ('max_pixels', images.MIN_SIDE ** 2),
                        ('near_duplicate_threshold', 0), ('seed', 0)):
      if FLAGS[name].value < least:
        raise BuildError(f'--{name} is {FLAGS[name].value}; it must be at least {least}')
    table = metadata.from_flags(FLAGS.metadata, FLAGS.metadata_columns, FLAGS.label_values, FLAGS.allow_unlisted,
                                FLAGS['label_map'].present)
    if FLAGS.patient_from_dicom and table:
      raise BuildError('--patient_from_dicom and --metadata both say where patient ids come from; give one')
    manifest, to_write = plan(Path(FLAGS.source_dir), None if table and table.labels else label_map, fractions,
                              FLAGS.seed, FLAGS.image_size, FLAGS.keep_aspect, FLAGS.max_pixels,
                              FLAGS.near_duplicate_threshold, table=table, patient_from_dicom=FLAGS.patient_from_dicom,
                              group_by=FLAGS.group_by)
    for warning in manifest['warnings']:
      print(f'WARNING: {warning}')
    if FLAGS.strict and manifest['rejected']:
      for r in manifest['rejected']:
        print(f'rejected: {r["path"]}: {r["reason"]}', file=sys.stderr)
      raise BuildError(f'--strict: {len(manifest["rejected"])} files or folders rejected; nothing written')
    write(manifest, to_write, Path(FLAGS.data_dir), FLAGS.overwrite)
  except BuildError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(summary(manifest))
  print(f'wrote {FLAGS.data_dir} (manifest: {Path(FLAGS.data_dir) / "manifest.json"})')
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main)
