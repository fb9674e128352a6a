"""Nothing the project reads can run code: no pickle, eval, exec or shell anywhere in the tree."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_FORBIDDEN = re.compile(r'\b(cloud)?pickle\b|\bmarshal\b|\bshelve\b|(?<![\w.])(eval|exec)\(|shell=True|'
                        r'allow_pickle=True')


def test_no_module_can_run_code_from_what_it_reads():
  offenders = [f'{path.relative_to(ROOT)}:{number}: {line.strip()}'
               for folder in ('covid_jax', 'data_prep', 'scripts', 'benchmarks', 'configs', 'tests')
               for path in sorted((ROOT / folder).rglob('*.py')) if path != Path(__file__).resolve()
               for number, line in enumerate(path.read_text().splitlines(), start=1)
               if _FORBIDDEN.search(line)]
  assert not offenders, '\n'.join(offenders)
