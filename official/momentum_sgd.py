"""SGD with heavy-ball momentum and L2 weight decay on weights only (MLPerf style).

    N-D variables:  v ← m·v + lr·(g + wd·w)
    1-D variables:  v ← m·v + lr·g          (BatchNorm γ/β, biases: no decay)
    w ← w − v

Whether a variable is "1-D" is read from its rank, not guessed from its name.
LARS (``official.lars``) is this update with a per-layer trust ratio.
"""

from __future__ import annotations

import keras
from keras import ops


def excluded_from_decay_and_trust(variable) -> bool:
    """BatchNorm parameters and biases: every variable of rank ≤ 1."""
    return len(variable.shape) <= 1


class MomentumSGD(keras.optimizers.Optimizer):
    """Momentum SGD with MLPerf's weight-decay convention."""

    def __init__(
        self,
        learning_rate=0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        name: str = "momentum_sgd",
        **kwargs,
    ):
        # Keras' own `weight_decay` is decoupled decay applied to every
        # variable; the decay here is L2 inside the update, on N-D weights only.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.momentum = float(momentum)
        self.l2_weight_decay = float(weight_decay)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.velocities = [
            self.add_variable_from_reference(variable, name="velocity") for variable in variables
        ]

    def scaled_step(self, gradient, variable, learning_rate):
        """lr·(g + wd·w) for N-D variables, lr·g for 1-D ones (LARS rescales it)."""
        if excluded_from_decay_and_trust(variable):
            return learning_rate * gradient
        return learning_rate * (gradient + self.l2_weight_decay * variable)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        velocity = self.velocities[self._get_variable_index(variable)]
        step = self.scaled_step(gradient, ops.convert_to_tensor(variable), learning_rate)
        self.assign(velocity, self.momentum * velocity + step)
        self.assign_sub(variable, velocity)

    def get_config(self):
        config = super().get_config()
        config.update(momentum=self.momentum, weight_decay=self.l2_weight_decay)
        return config
