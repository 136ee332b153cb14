"""Stops a diverged run at the step it diverged, before its state is saved.

Each replica step records, per replica, the first step whose clean loss,
adversarial loss or gradient was not finite (``NonFiniteGuard.check``, inside
the compiled step, no host round trip). After each host loop the trainer asks
``first()``; if a step went bad it raises ``NonFiniteError`` instead of
checkpointing, so the latest checkpoint on disk is the last good state.

Under float16 loss scaling an overflowing *gradient* is normal (the loss
scaler skips that step and lowers its scale), so only the losses are checked.

main.py's chief then records the divergence as ``diverged.json`` in the run's
directory (``record_divergence``): a sweep counts such a run as done, with the
result "diverged" (``conadv/studies/runner.py``), rather than as a failure.
"""

from __future__ import annotations

import os

import tensorflow as tf

from conadv.run.run_files import write_json
from official.per_replica import per_replica_variable

#: The file main.py's chief writes in --model_dir when the run stopped on a divergence.
DIVERGED_FILE = "diverged.json"

CLEAN_LOSS, ADVERSARIAL_LOSS, GRADIENT = 1, 2, 3
QUANTITIES = {CLEAN_LOSS: "clean loss", ADVERSARIAL_LOSS: "adversarial loss", GRADIENT: "gradient"}


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient; the message is one line.

    ``step``: the first step that was not finite; ``quantity``: what was not
    ("clean loss", ...); ``last_good_step``: the global step of the latest
    checkpoint, the last good state (None: no checkpoint yet)."""

    def __init__(self, message: str, step=None, quantity=None, last_good_step=None):
        super().__init__(message)
        self.step, self.quantity, self.last_good_step = step, quantity, last_good_step


class NonFiniteGuard:
    """Per replica: (first bad step, which quantity), or (−1, 0) while all is finite."""

    def __init__(self, strategy: tf.distribute.Strategy):
        self.strategy = strategy
        with strategy.scope():
            self._first = per_replica_variable(
                tf.constant([-1, 0], tf.int64), "first_nonfinite_step"
            )

    def check(self, step, clean_loss=None, adversarial_loss=None, gradients=None):
        """Records ``step`` if it is this replica's first with a non-finite quantity.

        Call inside the replica function; ``gradients`` is a list of tensors
        (a sum per tensor is checked: NaN and ±Inf propagate through it).
        """
        checks = []
        if clean_loss is not None:
            checks.append((CLEAN_LOSS, tf.math.is_finite(tf.reduce_sum(clean_loss))))
        if adversarial_loss is not None:
            checks.append((ADVERSARIAL_LOSS, tf.math.is_finite(tf.reduce_sum(adversarial_loss))))
        if gradients:
            total = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in gradients])
            checks.append((GRADIENT, tf.math.is_finite(total)))
        code = tf.constant(0, tf.int64)
        for quantity, finite in reversed(checks):  # the first failing check wins
            code = tf.where(finite, code, tf.constant(quantity, tf.int64))
        current = self._first.read_value()
        record = tf.logical_and(current[0] < 0, code > 0)
        value = tf.where(record, tf.stack([tf.cast(step, tf.int64), code]), current)
        return self._first.assign(value)

    def first(self) -> tuple[int, str] | None:
        """The earliest recorded (step, quantity name) over this worker's replicas."""
        bad = [
            (int(step), int(code))
            for step, code in (
                v.numpy() for v in self.strategy.experimental_local_results(self._first)
            )
            if step >= 0
        ]
        if not bad:
            return None
        step, code = min(bad)
        return step, QUANTITIES[code]

    def raise_if_diverged(self, files, last_saved: int):
        """Raises ``NonFiniteError`` (the caller then saves nothing) if a step of the last
        host loop diverged on any worker, naming the earliest: one replica's NaN reaches
        every worker's weights through the all-reduce. ``files`` is the run's ``RunFiles``
        (every worker agrees on the minimum); ``last_saved`` the latest checkpoint's step."""
        bad = self.first()
        never = 2**62
        local = never if bad is None else bad[0] * 4 + code_of(bad[1])
        first = files.agreed_step(local)  # the minimum over workers
        if first < never:
            step, code = divmod(first, 4)
            last_good = f"ckpt-{last_saved}" if last_saved >= 0 else "none (no checkpoint yet)"
            raise NonFiniteError(
                f"non-finite {QUANTITIES[code]} at step {step}; last good checkpoint {last_good}",
                step=step,
                quantity=QUANTITIES[code],
                last_good_step=last_saved if last_saved >= 0 else None,
            )


def code_of(quantity: str) -> int:
    """The number ``NonFiniteGuard`` records for a quantity's name."""
    return {name: code for code, name in QUANTITIES.items()}[quantity]


def record_divergence(model_dir: str, error: NonFiniteError):
    """Writes ``diverged.json`` in ``model_dir`` (atomically; the chief's to call): the
    error's one-line message, the step that was not finite and the global step of the
    last good checkpoint (None where there is none)."""
    write_json(
        os.path.join(model_dir, DIVERGED_FILE),
        {
            "message": str(error),
            "step": error.step,
            "quantity": error.quantity,
            "last_good_checkpoint_step": error.last_good_step,
        },
    )
