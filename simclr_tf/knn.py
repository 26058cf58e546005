"""k-nearest-neighbour classification of frozen features (a quick probe).

The weighted kNN of Wu et al. 2018 (arXiv 1805.01978, section 3.4), the
usual monitor of self-supervised CIFAR runs: the k training features most
cosine-similar to a query vote for their labels with weights
exp(s_i / tau), and the query gets the class with the largest total:

  score(c) = sum_{i in top-k(q)} exp(cos(q, x_i) / tau) [y_i = c].

No training and one hyperparameter-light pass, so it compares encoders
trained at the same budget without a linear probe's optimisation noise.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def knn_predict(train_features, train_labels, query_features,
                num_classes: int, k: int = 200, temperature: float = 0.07,
                batch_size: int = 1024) -> np.ndarray:
  """Predicts the class of every query by weighted kNN (cosine similarity).

  Args:
    train_features: [N, D] features of the labelled memory bank.
    train_labels: [N] int labels in [0, num_classes).
    query_features: [Q, D] features to classify.
    num_classes: number of classes C.
    k: neighbours (min(k, N) are used).
    temperature: tau of the vote weights exp(cos / tau); None or 0 gives
      every neighbour weight 1 (majority vote).
    batch_size: queries per similarity matrix ([batch_size, N] floats).
  Returns:
    [Q] int64 predicted classes.
  """
  bank = tf.math.l2_normalize(tf.cast(train_features, tf.float32), axis=-1)
  labels = tf.cast(train_labels, tf.int32)
  queries = tf.math.l2_normalize(tf.cast(query_features, tf.float32), -1)
  k = min(int(k), int(bank.shape[0]))
  predictions = []
  for start in range(0, int(queries.shape[0]), batch_size):
    sims = tf.matmul(queries[start:start + batch_size], bank,
                     transpose_b=True)                       # [q, N]
    top_sims, top_idx = tf.math.top_k(sims, k=k)            # [q, k]
    weights = (tf.exp(top_sims / temperature) if temperature
               else tf.ones_like(top_sims))
    votes = tf.one_hot(tf.gather(labels, top_idx), num_classes)  # [q, k, C]
    scores = tf.reduce_sum(votes * weights[..., tf.newaxis], axis=1)
    predictions.append(tf.argmax(scores, axis=-1).numpy())
  return np.concatenate(predictions) if predictions else np.zeros([0],
                                                                  np.int64)


def knn_accuracy(train_features, train_labels, query_features, query_labels,
                 num_classes: int, k: int = 200,
                 temperature: float = 0.07) -> float:
  """Top-1 accuracy of `knn_predict` on labelled queries.

  Args:
    train_features: [N, D] memory-bank features.
    train_labels: [N] int labels.
    query_features: [Q, D] query features.
    query_labels: [Q] int labels.
    num_classes: number of classes.
    k: neighbours.
    temperature: vote temperature (see `knn_predict`).
  Returns:
    Fraction of queries classified correctly.
  """
  predicted = knn_predict(train_features, train_labels, query_features,
                          num_classes, k=k, temperature=temperature)
  return float(np.mean(predicted == np.asarray(query_labels)))
