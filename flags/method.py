"""The training method and its attack."""

from absl import flags as absl_flags

#: The methods and update passes ``conadv/steps.py`` implements (tests/test_layout.py checks).
METHODS = ("vanilla", "disadv", "conadv")
UPDATE_PASSES = ("concatenated", "separate")
#: Where the adversarial images come from (conadv/free_attack.py).
ATTACK_SOURCES = ("separate", "clean_pass")


def define(fv):
    absl_flags.DEFINE_enum(
        "method",
        "conadv",
        list(METHODS),
        "vanilla, DisAdv (sequential adversarial training) or ConAdv.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "staleness",
        1,
        "ConAdv: attack with the weights of this many steps ago (τ).",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "attack_eps", 4.0, "L-inf budget in pixel units (0-255).", flag_values=fv
    )
    absl_flags.DEFINE_float(
        "attack_step_size",
        None,
        "PGD step in pixels. Default: eps for one step (it reaches the boundary), "
        "2.5*eps/steps for several.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer("attack_steps", 1, "PGD steps (the paper uses 1).", flag_values=fv)
    absl_flags.DEFINE_enum(
        "attack_init",
        "random",
        ["random", "zero"],
        "Start from a uniform random point in the ball, or from the image.",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "attack_bn",
        "aux",
        ["aux", "main"],
        "BatchNorm branch of the attack's forward pass.",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "attack_target",
        "untargeted",
        ["untargeted", "random"],
        "Raise the true label's loss, or lower a random wrong label's.",
        flag_values=fv,
    )
    absl_flags.DEFINE_enum(
        "attack_source",
        "separate",
        list(ATTACK_SOURCES),
        "separate: DisAdv and ConAdv attack with passes of their own (the paper). "
        "clean_pass: the free attack, from the input gradient of the update's clean pass "
        "(no attack pass: 6 units of work per image instead of 8); it is a 1-step attack "
        "from the clean image through the main BatchNorm (it sets --attack_steps=1 "
        "--attack_init=zero --attack_bn=main, and refuses other values), and it takes the "
        "sign of the label-smoothed training loss's gradient (with --label_smoothing=0, "
        "the separate attack's). ConAdv then trains step t+tau on the adversarial images "
        "of step t's clean batch beside step t+tau's own clean batch, where the paper "
        "pairs each clean batch with its own adversarial copy.",
        flag_values=fv,
    )
    absl_flags.DEFINE_float(
        "eval_attack_eps",
        None,
        "Robust evaluation: also report top-1/top-5 of the main branch under L-inf PGD "
        "with random start of this budget (pixel units); 0 gives the clean numbers.",
        flag_values=fv,
    )
    absl_flags.DEFINE_bool(
        "eval_predictions",
        False,
        "--mode=eval: also write each evaluation example's top-5 class ids, in order, "
        "to <model_dir>/predictions.json.",
        flag_values=fv,
    )
    absl_flags.DEFINE_integer(
        "eval_attack_steps", 10, "Robust evaluation: PGD steps (K).", flag_values=fv
    )
    absl_flags.DEFINE_float(
        "eval_attack_step_size",
        None,
        "Robust evaluation: PGD step in pixels (default 2.5*eps/K, eps for K = 1).",
        flag_values=fv,
    )
