"""`data_prep.build --group_by`: patient (no patient crosses splits) or image (the study's split, which leaks)."""

import collections

from data_prep import build
from tests import fixtures


def _patients_in_several_splits(manifest: dict) -> set[str]:
  splits = collections.defaultdict(set)
  for example in manifest['examples']:
    splits[example['patient_id']].add(example['split'])
  return {patient for patient, names in splits.items() if len(names) > 1}


def test_image_level_split_leaks_patients_and_says_so(synthetic_source):
  manifest, to_write = build.plan(synthetic_source.root, build.parse_label_map('0=0,1=1'),
                                  build.parse_fractions('64,16,20'), 0, 32, max_pixels=fixtures.MAX_PIXELS,
                                  progress=False, group_by='image')
  to_write.close()
  leaked = _patients_in_several_splits(manifest)
  assert manifest['group_by'] == 'image' and leaked
  warning, = [w for w in manifest['warnings'] if w.startswith('--group_by image')]
  patients = {e['patient_id'] for e in manifest['examples']}
  assert f'{len(leaked)} of {len(patients)} patients' in warning
  assert f'WARNING: {warning}' in build.summary(manifest)
  assert 'split image by image' in build.summary(manifest)


def test_patient_level_split_is_the_default_and_never_leaks(built_dataset):
  _, manifest = built_dataset
  assert manifest['group_by'] == 'patient' and not _patients_in_several_splits(manifest)
  assert not any(w.startswith('--group_by') for w in manifest['warnings'])
