"""absl flags of ``main.py``, grouped by concern, and their validation.

``define_all()`` defines every flag once; ``validation.validate`` checks a
parsed set and raises ``FlagError`` with a one-line message naming the flag.
"""

from absl import flags as absl_flags

from flags import data, method, model, optimization, run, sharpness, validation

_GROUPS = (run, data, model, method, optimization, sharpness)


def define_all(flag_values: absl_flags.FlagValues = absl_flags.FLAGS):
    """Defines every ConAdv flag in ``flag_values`` (idempotent)."""
    if "method" in flag_values:
        return
    for group in _GROUPS:
        group.define(flag_values)


__all__ = ["define_all", "run", "validation"]
