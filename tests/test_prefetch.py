"""Input ahead of the step (input_pipeline.ahead): the next batch is made, and its transfer dispatched, before the
current one reaches the step; the batches, and their order, are those of the reader without the look-ahead."""

import numpy as np

from covid_jax import input_pipeline


def test_each_batch_is_handed_over_after_the_next_is_made():
  made = []

  def batches():
    for i in range(4):
      made.append(i)
      yield i

  handed = [(batch, list(made)) for batch in input_pipeline.ahead(batches())]
  assert handed == [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2, 3]), (3, [0, 1, 2, 3])]


def test_the_readers_batches_come_unchanged_and_in_order(built_dataset):
  data_dir, _ = built_dataset
  reader = input_pipeline.SplitReader(data_dir, 'val', 32)
  cases = {
      'train_epoch': dict(batch_size=8, epoch=2, seed=5, flip=True, contrast=0.2),
      'eval_batches': dict(batch_size=16),
  }
  for method, arguments in cases.items():
    ahead_of_use = list(getattr(reader, method)(**arguments))
    as_made = list(getattr(input_pipeline.SplitReader, method).__wrapped__(reader, **arguments))
    assert len(ahead_of_use) == len(as_made) > 1, method
    for got, want in zip(ahead_of_use, as_made):
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=f'{method} {key}')
