"""Weighted kNN probe."""

import numpy as np

from simclr_tf import knn


def test_knn_by_hand():
  bank = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], np.float32)
  labels = np.array([0, 0, 1, 2])
  queries = np.array([[2, 0.1], [0.1, 3], [-5, 0.2]], np.float32)
  # k=1: nearest neighbour by cosine (scale does not matter).
  np.testing.assert_array_equal(
      knn.knn_predict(bank, labels, queries, 3, k=1), [0, 1, 2])
  # k=3, majority vote: the two class-0 neighbours win everywhere they are.
  np.testing.assert_array_equal(
      knn.knn_predict(bank, labels, queries[:1], 3, k=3, temperature=None),
      [0])
  # Weighted vote: one very close class-1 neighbour beats two far class-0s.
  q = np.array([[0.05, 1]], np.float32)
  assert knn.knn_predict(bank, labels, q, 3, k=3, temperature=0.01)[0] == 1
  assert knn.knn_predict(bank, labels, q, 3, k=3, temperature=None)[0] == 0
  assert abs(knn.knn_accuracy(bank, labels, queries, [0, 1, 0], 3, k=1)
             - 2 / 3) < 1e-9
  np.testing.assert_array_equal(
      knn.knn_predict(bank, labels, queries, 3, k=2, batch_size=2),
      knn.knn_predict(bank, labels, queries, 3, k=2))
