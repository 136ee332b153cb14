"""Callbacks for the BatchNorm statistics a ``ConAdvModel`` evaluates with.

A BatchNorm's moving statistics start at their initializers' values (Keras':
mean 0, variance 1), and each training step replaces a share 1 − momentum of
them by a batch's: after n steps the initial values still weigh momentum**n.
keras.applications use momentum 0.99, so a short ``fit`` leaves evaluation
normalising with statistics that are still largely 0 and 1 (0.99**176 = 17 %
after the README's 176 steps, enough to evaluate at chance).

- ``PreciseBatchNorm(data, batches, before_validation=False)`` (the public
  ``conadv.keras.PreciseBatchNorm``): at the end of ``fit``, and before each
  validation if asked, it replaces the main branch's moving statistics by
  population statistics under the current weights by calling
  ``ConAdvModel.precise_bn(data, batches)``. It is not
  ``official.precise_bn.PreciseBatchNorm``, the computation ``precise_bn`` runs.
- ``InitialStatisticsWarning``: ``ConAdvModel.fit`` appends it to every
  ``fit``'s callbacks, after the user's, so it ends last; it warns, once per
  model, when a ``fit`` ends with moving statistics that still hold more than
  1 % of their initial values.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import keras
import numpy as np
import tensorflow as tf

from conadv.keras_fit import data as data_lib
from official.split_batch_norm import split_layers

#: The share of initial values above which the moving statistics are worth a warning.
WARN_ABOVE = 0.01


@dataclasses.dataclass
class _ModelRecord:
    """What the callbacks know of one model across its ``fit``s."""

    #: The warning was given (it is given once per model).
    warned: bool = False
    #: A ``PreciseBatchNorm`` callback set the statistics during the ``fit`` running.
    recomputed: bool = False


_records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _record(model) -> _ModelRecord:
    return _records.setdefault(model, _ModelRecord())


class PreciseBatchNorm(keras.callbacks.Callback):
    """Recomputes a ``ConAdvModel``'s evaluation statistics when ``fit`` ends.

    At the end of ``fit`` it calls ``model.precise_bn(data, batches)``: the
    main branch's moving statistics become the population statistics of
    ``batches`` batches of ``data`` (``(images, labels)`` batches: training
    images without augmentation, as evaluation sees them) under the final
    weights. ``before_validation=True`` does the same at the start of every
    evaluation the callback takes part in (``on_test_begin``): each
    validation ``fit`` runs, so ``val_*`` logs are measured as ``evaluate``
    after ``precise_bn`` would measure them. Training is unchanged: it
    normalises with batch statistics. ``statistics`` holds the last result
    (``official.precise_bn.PreciseStatistics``).
    """

    def __init__(self, data: tf.data.Dataset, batches: int, before_validation: bool = False):
        super().__init__()
        if not isinstance(data, tf.data.Dataset):
            raise TypeError(
                "conadv.keras.PreciseBatchNorm takes a tf.data.Dataset of (images, labels) "
                f"batches, got {type(data).__name__}"
            )
        if int(batches) < 1:
            raise ValueError(f"conadv.keras.PreciseBatchNorm needs batches >= 1, got {batches}")
        self.data = data
        self.batches = int(batches)
        self.before_validation = bool(before_validation)
        self.statistics = None

    def set_model(self, model):
        # Duck-typed: this module cannot import ConAdvModel, whose fit imports it.
        if not callable(getattr(model, "precise_bn", None)):
            raise TypeError(
                "conadv.keras.PreciseBatchNorm recomputes the statistics of a "
                f"conadv.keras.ConAdvModel; {type(model).__name__} {model.name!r} is not one: "
                "wrap the model in ConAdvModel, or leave the callback out"
            )
        super().set_model(model)

    def on_test_begin(self, logs=None):
        if self.before_validation:
            self._recompute()

    def on_train_end(self, logs=None):
        self._recompute()

    def _recompute(self):
        self.statistics = self.model.precise_bn(self.data, self.batches)
        _record(self.model).recomputed = True


def _constant_value(initializer):
    """The value a Zeros, Ones or Constant initializer fills with; None for any other (a
    random initializer has no one initial value)."""
    if isinstance(initializer, keras.initializers.Zeros):
        return 0.0
    if isinstance(initializer, keras.initializers.Ones):
        return 1.0
    if isinstance(initializer, keras.initializers.Constant):
        return initializer.value
    return None


def holds_initial_values(layer) -> bool:
    """Whether a split BatchNorm's main moving mean or variance is exactly its initializer's
    value: not pretrained, loaded, set, recomputed or trained."""
    for variable, initializer in (
        (layer.main_moving_mean, layer.moving_mean_initializer),
        (layer.main_moving_variance, layer.moving_variance_initializer),
    ):
        value = _constant_value(initializer)
        if value is None:
            continue
        initial = np.broadcast_to(np.asarray(value, np.float32), variable.shape)
        if np.array_equal(variable.numpy(), initial):
            return True
    return False


def _message(share: float, steps: int, momentum: float, layers: int, total: int) -> str:
    where = "" if layers == total else f" in {layers} of its {total} BatchNorm layers"
    return (
        f"ConAdvModel.fit ends with BatchNorm moving statistics that still hold "
        f"{100 * share:.0f} % of their initial values after {steps} steps at momentum "
        f"{momentum:g}{where}, and evaluate, predict and export_model normalise with them "
        "(the main branch). Recompute them under the trained weights: call "
        "model.precise_bn(dataset, batches) on training images without augmentation, or "
        "pass callbacks=[conadv.keras.PreciseBatchNorm(dataset, batches)] to fit. "
        "(Said once per model.)"
    )


class InitialStatisticsWarning(keras.callbacks.Callback):
    """Warns, once per model, at the end of a ``fit`` whose main-branch moving statistics
    still hold more than 1 % of their initial values.

    Each step updates every trainable BatchNorm's main branch once (one
    optimizer step), so a BatchNorm whose statistics are at their
    initializers' values when ``fit`` begins holds a share momentum**n of
    them after the ``fit``'s n steps. Any other holds none to warn about:
    statistics from pretrained weights, set by ``precise_bn``,
    ``load_weights`` or ``set_weights``, or trained by an earlier ``fit`` of
    the model (it checked them when it ended, and further steps only lower
    the share); nor does any after a ``PreciseBatchNorm`` callback ran during
    the ``fit`` (``ConAdvModel.fit`` appends this callback after the user's,
    so its ``on_train_end`` comes after theirs). Frozen BatchNorms are not
    counted: ``precise_bn`` keeps their statistics too.
    """

    def on_train_begin(self, logs=None):
        _record(self.model).recomputed = False
        self._first_step = int(self.model.optimizer.iterations.numpy())
        self._layers = split_layers(self.model.network)
        self._initial = [
            layer for layer in self._layers if layer.trainable and holds_initial_values(layer)
        ]

    def on_train_end(self, logs=None):
        record = _record(self.model)
        steps = int(self.model.optimizer.iterations.numpy()) - self._first_step
        initial = [layer for layer in self._initial if layer.trainable]
        if record.warned or record.recomputed or steps < 1 or not initial:
            return
        shares = [layer.momentum**steps for layer in initial]
        share = max(shares)
        if share <= WARN_ABOVE:
            return
        record.warned = True
        momentum = initial[shares.index(share)].momentum
        above = sum(s > WARN_ABOVE for s in shares)
        message = _message(share, steps, momentum, above, len(self._layers))
        warnings.warn(message, UserWarning, stacklevel=data_lib._user_stacklevel())
