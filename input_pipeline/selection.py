"""The selection set: a fixed, stratified part of the training set held out of training.

A study that tunes a learning rate must choose it on data the runs did not
train on and that is not the test set (choosing on the test set makes the
test number optimistic). ``--selection_examples N`` (or a fraction below 1)
holds N training examples out of every run's training stream, train top-1
and precise BatchNorm statistics, and evaluates the finished run on them
(``SELECTION``, ``summary.json``'s ``selection_top1``).

Which examples: each training example has a key that names it where it is
stored, not where a shuffled stream puts it (the digits' index in the fixed
split; a record's file name and index in its file). A keyed hash of the key
and ``--selection_seed`` orders every class's examples, and each class gives
its first ``quota`` of them, the quotas splitting N in proportion to the
class sizes (largest remainders). So the part is the same for every method,
every ``--seed`` and every layout of devices, stratified exactly, and another
``--selection_seed`` draws another part. A record source holds out the
records whose hash is at most their class's threshold, so the stream is
filtered record by record in the graph.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from input_pipeline.errors import DataError

#: Hash values lie in [0, HASH_BUCKETS): 2**62 makes two keys' collision in a split of
#: ImageNet's size about one in ten million.
HASH_BUCKETS = 2**62
#: The hash's key is fixed apart from the seed: the part must never change between runs.
_KEY_SALT = 20220425


@dataclasses.dataclass(frozen=True)
class Selection:
    """``--selection_examples`` (a count ≥ 1, or a fraction in (0, 1)) and ``--selection_seed``."""

    amount: float
    seed: int = 0

    @classmethod
    def from_flags(cls, amount: float | None, seed: int) -> Selection | None:
        if not amount:
            return None
        return cls(float(amount), int(seed))

    def count(self, total: int) -> int:
        """Examples held out of a training set of ``total``; refuses what leaves too few."""
        count = round(self.amount * total) if self.amount < 1 else int(self.amount)
        if not 1 <= count <= total // 2:
            raise DataError(
                f"--selection_examples={self.amount:g} holds out {count} of the {total} "
                f"training examples; hold out 1 to {total // 2} (a count, or a fraction < 1)"
            )
        return count

    def quotas(self, class_counts: np.ndarray) -> np.ndarray:
        """Per class, how many of its examples are held out: ``count`` split in proportion
        to the class sizes, the largest remainders rounded up (ties to the lower class),
        never a class's last training example (its share goes to the next remainders)."""
        class_counts = np.asarray(class_counts, np.int64)
        count = self.count(int(class_counts.sum()))
        exact = count * class_counts / class_counts.sum()
        quotas = np.floor(exact).astype(np.int64)
        order = np.lexsort((np.arange(len(exact)), -(exact - quotas)))
        while (left := count - int(quotas.sum())) > 0:
            room = [c for c in order if quotas[c] < class_counts[c] - 1]
            if not room:
                raise DataError(
                    f"--selection_examples={self.amount:g}: the classes' {int(class_counts.sum())} "
                    "training examples cannot give it and keep one example of each class "
                    "to train on; hold out fewer"
                )
            quotas[room[:left]] += 1
        return quotas

    def hashes(self, keys) -> tf.Tensor:
        """int64 in [0, HASH_BUCKETS) of each string key: keyed by the seed, stable across
        machines and versions (SipHash, ``tf.strings.to_hash_bucket_strong``)."""
        return tf.strings.to_hash_bucket_strong(keys, HASH_BUCKETS, [_KEY_SALT, self.seed])

    def thresholds(self, hashes: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """Per class, the largest hash held out (−1: none), so that "held out" is ``hash ≤
        threshold[label]``: each class's ``quota`` smallest hashes."""
        hashes, labels = np.asarray(hashes, np.int64), np.asarray(labels, np.int64)
        counts = np.bincount(labels, minlength=num_classes)
        quotas = self.quotas(counts)
        thresholds = np.full(num_classes, -1, np.int64)
        for label in np.flatnonzero(quotas):
            thresholds[label] = np.sort(hashes[labels == label])[quotas[label] - 1]
        return thresholds

    def held_out(self, keys, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """A boolean mask over in-memory examples (string keys and labels)."""
        hashes = self.hashes(tf.constant(keys)).numpy()
        thresholds = self.thresholds(hashes, labels, num_classes)
        return hashes <= thresholds[np.asarray(labels, np.int64)]

    def describe(self) -> dict:
        """What ``summary.json`` and the data's description record of the rule."""
        return {"amount": self.amount, "seed": self.seed}
