"""AutoAugment and RandAugment: the policies that draw ``image_ops``.

The policies (``autoaugment``, ``randaugment``) draw every random choice from
one seed: the same seed gives the same augmentation, which the deterministic
input mode relies on. Their ``*_plan`` functions return those choices, so the
choice probabilities can be tested apart from the image work.
"""

from __future__ import annotations

import tensorflow as tf

from input_pipeline.image_ops import (
    autocontrast,
    brightness,
    color,
    contrast,
    equalize,
    fresh_seed,
    identity,
    invert,
    posterize,
    rotate,
    sharpness,
    shear_x,
    shear_y,
    solarize,
    solarize_add,
    translate_x,
    translate_y,
)

#: AutoAugment "v0": the ImageNet policy of the TPU reference implementations,
#: (op, probability, level) with levels on a 0–10 scale.
POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)

#: The ImageNet policy of Cubuk et al. 2019 (AutoAugment, Appendix), with the
#: paper's ten magnitudes 0–9.
POLICY_IMAGENET = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)

#: policy name -> (sub-policies, the level that means full strength).
POLICIES = {"v0": (POLICY_V0, 10), "imagenet": (POLICY_IMAGENET, 9)}

#: The 14 transformations of RandAugment (Cubuk et al. 2020), drawn uniformly.
RANDAUGMENT_OPS = (
    "Identity",
    "AutoContrast",
    "Equalize",
    "Rotate",
    "Solarize",
    "Color",
    "Posterize",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
)

#: Full-strength arguments (the AutoAugment paper's search ranges): rotation
#: ±30°, shear ±0.3, translation ±150/331 of the image side, enhancement
#: factors 1 ± 0.9 (reached as 0.1 + 1.8·strength), posterize down to 4 bits,
#: solarize threshold down to 0, solarize-add up to +110 (TPU reference).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_FRACTION = 150.0 / 331.0
MAX_SOLARIZE_ADD = 110.0
#: Grey used outside the image by the geometric ops of the policies.
POLICY_FILL = 128


def _signed(value, negate):
    return tf.where(negate, -value, value)


def apply_op(image, name, strength, negate, fill=POLICY_FILL):
    """Applies policy op ``name`` at ``strength`` (1.0 = the level of full strength).

    Geometric ops are mirrored when ``negate`` is true; magnitudes above full
    strength (RandAugment with M > 10) extrapolate, clipped to valid arguments.
    """
    s = float(strength)
    side = tf.cast(tf.shape(image)[:2], tf.float32)
    if name in ("Identity", "AutoContrast", "Equalize", "Invert"):
        return {
            "Identity": identity,
            "AutoContrast": autocontrast,
            "Equalize": equalize,
            "Invert": invert,
        }[name](image)
    if name == "Rotate":
        return rotate(image, _signed(MAX_ROTATE_DEGREES * s, negate), fill)
    if name == "ShearX":
        return shear_x(image, _signed(MAX_SHEAR * s, negate), fill)
    if name == "ShearY":
        return shear_y(image, _signed(MAX_SHEAR * s, negate), fill)
    if name == "TranslateX":
        return translate_x(image, _signed(MAX_TRANSLATE_FRACTION * s * side[1], negate), fill)
    if name == "TranslateY":
        return translate_y(image, _signed(MAX_TRANSLATE_FRACTION * s * side[0], negate), fill)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        enhance = {"Color": color, "Contrast": contrast, "Brightness": brightness}
        return enhance.get(name, sharpness)(image, max(0.0, 0.1 + 1.8 * s))
    if name == "Posterize":
        return posterize(image, 8 - round(4 * s))
    if name == "Solarize":
        return solarize(image, min(256.0, max(0.0, 256.0 * (1.0 - s))))
    if name == "SolarizeAdd":
        return solarize_add(image, round(MAX_SOLARIZE_ADD * s), 128)
    raise ValueError(f"unknown augmentation op {name!r}")


def _seed_or_fresh(seed):
    return fresh_seed() if seed is None else tf.cast(seed, tf.int32)


def autoaugment_plan(policy="v0", seed=None):
    """The random choices of one AutoAugment draw.

    ``subpolicy``: uniform index into the policy's table; ``apply`` [2]: each
    op of the sub-policy runs with its probability; ``negate`` [2]: the sign
    of geometric ops, fair coin.
    """
    table, _ = _policy(policy)
    choose, coin, sign = tf.unstack(tf.random.experimental.stateless_split(_seed_or_fresh(seed), 3))
    index = tf.random.stateless_uniform([], choose, 0, len(table), dtype=tf.int32)
    probabilities = tf.constant([[op[1] for op in sub] for sub in table], tf.float32)
    apply = tf.random.stateless_uniform([2], coin) < tf.gather(probabilities, index)
    negate = tf.random.stateless_uniform([2], sign) < 0.5
    return {"subpolicy": index, "apply": apply, "negate": negate}


def _policy(policy):
    if policy not in POLICIES:
        raise ValueError(f"unknown AutoAugment policy {policy!r}; choose one of {list(POLICIES)}")
    return POLICIES[policy]


def autoaugment(image, policy="v0", seed=None):
    """One random sub-policy of ``policy`` ("v0" or "imagenet") applied to ``image``."""
    table, full_level = _policy(policy)
    plan = autoaugment_plan(policy, seed)

    def branch(sub):
        def run():
            out = image
            for j, (name, _, level) in enumerate(sub):
                out = tf.cond(
                    plan["apply"][j],
                    lambda out=out, name=name, level=level, j=j: apply_op(
                        out, name, level / full_level, plan["negate"][j]
                    ),
                    lambda out=out: out,
                )
            return out

        return run

    out = tf.switch_case(plan["subpolicy"], [branch(sub) for sub in table])
    out.set_shape(image.shape)
    return out


def randaugment_plan(num_layers=2, seed=None):
    """The random choices of one RandAugment draw: ``ops`` [N] uniform over
    ``RANDAUGMENT_OPS`` (with replacement) and ``negate`` [N] fair coins."""
    choose, sign = tf.unstack(tf.random.experimental.stateless_split(_seed_or_fresh(seed), 2))
    ops = tf.random.stateless_uniform([num_layers], choose, 0, len(RANDAUGMENT_OPS), tf.int32)
    negate = tf.random.stateless_uniform([num_layers], sign) < 0.5
    return {"ops": ops, "negate": negate}


def randaugment(image, num_layers=2, magnitude=10.0, seed=None):
    """``num_layers`` uniformly chosen ops, each at ``magnitude`` (10 = full strength)."""
    plan = randaugment_plan(num_layers, seed)
    strength = float(magnitude) / 10.0
    out = image
    for layer in range(num_layers):
        branches = [
            lambda out=out, name=name, layer=layer: apply_op(
                out, name, strength, plan["negate"][layer]
            )
            for name in RANDAUGMENT_OPS
        ]
        out = tf.switch_case(plan["ops"][layer], branches)
        out.set_shape(image.shape)
    return out


def policy_fn(
    augment="none", autoaugment_policy="v0", randaugment_layers=2, randaugment_magnitude=10.0
):
    """The ``--augment`` setting as ``fn(uint8 image, seed=None) -> uint8 image``, or None."""
    if augment == "none":
        return None
    if augment == "autoaugment":
        _policy(autoaugment_policy)
        return lambda image, seed=None: autoaugment(image, autoaugment_policy, seed)
    if augment == "randaugment":
        return lambda image, seed=None: randaugment(
            image, randaugment_layers, randaugment_magnitude, seed
        )
    raise ValueError(f"unknown augmentation {augment!r}; choose none, autoaugment or randaugment")
