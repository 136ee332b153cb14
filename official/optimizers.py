"""``--optimizer`` names to optimizers."""

from __future__ import annotations

from official.lars import LARS
from official.momentum_sgd import MomentumSGD

OPTIMIZERS = ("lars", "momentum")


def build_optimizer(
    name: str,
    learning_rate,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    eta: float = 0.001,
    epsilon: float = 0.0,
):
    """LARS (the paper's optimizer) or plain momentum SGD for comparison."""
    if name == "lars":
        return LARS(
            learning_rate, momentum=momentum, weight_decay=weight_decay, eta=eta, epsilon=epsilon
        )
    if name == "momentum":
        return MomentumSGD(learning_rate, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
