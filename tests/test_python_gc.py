"""Full garbage collections are held back within the block and come back after it, as CPython reports them."""

import contextlib
import gc
import json
import subprocess
import sys
from pathlib import Path

from covid_jax import python_gc

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter, whose small heap lets CPython's own rule start full collections quickly.
_CHURN_IN_AND_OUT_OF_THE_BLOCK = '''
import gc, json
from covid_jax import python_gc

gc.set_threshold(20, 1, 1)
generations = []
gc.callbacks.append(lambda phase, info: phase == 'stop' and generations.append(info['generation']))

def churn(kept):
  for i in range(20000):
    cycle = []
    cycle.append(cycle)  # Garbage that only a collection frees.
    kept.append([i])  # Survivors, which grow generation 2.

def collections_during(kept):
  generations.clear()
  churn(kept)
  return sorted(set(generations))

kept = []
result = {'before': collections_during(kept)}
with python_gc.full_collections_deferred():
  result['inside'] = collections_during(kept)
  result['threshold_inside'] = gc.get_threshold()
result['after'] = collections_during(kept)
result['threshold_after'] = gc.get_threshold()
print(json.dumps(result))
'''


def test_full_collections_wait_for_the_block_to_close():
  child = subprocess.run([sys.executable, '-c', _CHURN_IN_AND_OUT_OF_THE_BLOCK], cwd=ROOT, capture_output=True,
                         text=True, check=True)
  result = json.loads(child.stdout)
  assert result['before'] == [0, 1, 2]  # The same churn sets off full collections outside the block,
  assert result['inside'] == [0, 1]  # none inside it, while the young generations are still collected,
  assert result['after'] == [0, 1, 2]  # and full ones again after it.
  assert result['threshold_inside'][:2] == [20, 1] and result['threshold_after'] == [20, 1, 1]


def test_overlapping_blocks_restore_the_threshold_when_the_last_closes():
  """Blocks opened in one thread and closed in another order (as threads may) keep the deferral until the last."""
  original = gc.get_threshold()
  first, second = contextlib.ExitStack(), contextlib.ExitStack()
  first.enter_context(python_gc.full_collections_deferred())
  second.enter_context(python_gc.full_collections_deferred())
  deferred = gc.get_threshold()
  first.close()
  assert gc.get_threshold() == deferred
  second.close()
  assert gc.get_threshold() == original
  assert deferred[:2] == original[:2] and deferred[2] > 10**9
