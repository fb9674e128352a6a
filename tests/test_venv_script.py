"""scripts/venv.sh, sourced as the scripts source it (errexit, nounset, pipefail), on a stand-in environment."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import runs

_FAKE_PYTHON = '#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n'


def _source(folder: Path, accelerator: str | None) -> subprocess.CompletedProcess:
  """Sources a copy of scripts/venv.sh in `folder`, whose .venv is a stand-in that records pip's calls."""
  env = {'PATH': '/usr/bin:/bin', **({'COVID_JAX_ACCELERATOR': accelerator} if accelerator else {})}
  return subprocess.run(['bash', '-c', 'set -euo pipefail; source scripts/venv.sh; echo sourced'], cwd=folder,
                        env=env, capture_output=True, text=True)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
  (tmp_path / 'scripts').mkdir()
  shutil.copy(runs.ROOT / 'scripts' / 'venv.sh', tmp_path / 'scripts')
  for name in ('requirements.txt', 'requirements-gpu.txt', 'requirements-gpu-cuda13.txt', 'requirements-tpu.txt'):
    shutil.copy(runs.ROOT / name, tmp_path)
  python = tmp_path / '.venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(_FAKE_PYTHON)
  python.chmod(0o755)
  (python.parent / 'activate').write_text('')
  return tmp_path


@pytest.mark.parametrize('accelerator, requirements', [(None, 'requirements.txt'), ('cpu', 'requirements.txt'),
                                                       ('cuda12', 'requirements-gpu.txt'),
                                                       ('cuda13', 'requirements-gpu-cuda13.txt'),
                                                       ('tpu', 'requirements-tpu.txt')])
def test_installs_the_chosen_requirements_once(folder, accelerator, requirements):
  for _ in range(2):  # The second time the stamp matches: nothing to install.
    done = _source(folder, accelerator)
    assert done.returncode == 0 and done.stdout.strip() == 'sourced', done.stderr
  assert (folder / '.venv' / 'bin' / 'calls').read_text().splitlines() == [f'-m pip install --quiet -r {requirements}']


def test_cpu_stamp_is_the_digest_of_requirements_txt(folder):
  """A .venv made before the accelerator choice existed is not reinstalled."""
  assert _source(folder, None).returncode == 0
  digest = hashlib.sha256((folder / 'requirements.txt').read_bytes()).hexdigest()
  assert (folder / '.venv' / '.requirements.sha256').read_text().strip() == digest


def test_an_unknown_accelerator_is_named(folder):
  done = _source(folder, 'cuda11')
  assert done.returncode == 2
  assert 'COVID_JAX_ACCELERATOR=cuda11: unknown; one of cpu, cuda12, cuda13, tpu' in done.stderr
