"""How ``--mode sharpness`` measures a trained run (``conadv/studies/sharpness.py``)."""

from absl import flags as absl_flags

#: The flags that set a measurement: ``sharpness.json`` records them, and a sweep
#: measures a run again when they change.
SETTINGS = (
    "sharpness_examples",
    "sharpness_iterations",
    "sharpness_tolerance",
    "sharpness_eps",
    "sharpness_steps",
)


def settings(values) -> dict:
    """``SETTINGS`` as given in ``values`` (absl FLAGS or alike)."""
    return {name: getattr(values, name) for name in SETTINGS}


#: The folder of a run's measurements, one file per setting (``measurement_name``);
#: ``sharpness.json`` beside it is the latest.
MEASUREMENTS_DIR = "sharpness"


def measurement_name(settings: dict) -> str:
    """``sharpness/<hash of the settings>.json``: a measurement with other settings is
    kept beside this one, never written over it."""
    import hashlib
    import json

    text = json.dumps(settings, sort_keys=True)
    return f"{MEASUREMENTS_DIR}/{hashlib.sha256(text.encode()).hexdigest()[:10]}.json"


def define(fv):
    absl_flags.DEFINE_integer(
        "sharpness_examples",
        1024,
        "--mode sharpness: the first N training images (evaluation preprocessing, fixed "
        "order) the training loss is taken over.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "sharpness_iterations",
        30,
        "--mode sharpness: at most this many power iterations (Hessian-vector products, "
        "about 2 gradient evaluations each) for the top Hessian eigenvalue.",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "sharpness_tolerance",
        1e-3,
        "--mode sharpness: stop the power iteration when the eigenvalue changes by less than "
        "this, relative.",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "sharpness_eps",
        1e-3,
        "--mode sharpness: ε of Keskar et al.'s ε-sharpness (the box |z_i| <= ε(|θ_i| + 1)).",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "sharpness_steps",
        10,
        "--mode sharpness: projected sign-gradient ascent steps for the ε-sharpness (one "
        "gradient evaluation each).",
        flag_values=fv,
    )
