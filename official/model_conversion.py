"""Converting a Keras model to split BatchNorm and back (``conadv.keras`` is the public face).

Model surgery that knows nothing of adversaries: any functional or Sequential
model, the ResNets of ``official/resnet.py`` included.

``split_batch_norm`` copies a functional or Sequential model (nested models
included) with every ``keras.layers.BatchNormalization`` replaced by the
project's ``SplitBatchNormalization``: a main branch (clean images, used for
evaluation and export) and an auxiliary branch (adversarial images), both
starting from the original's γ, β and moving statistics, and carrying every
argument of the layer it replaces (momentum, epsilon, center and scale,
initializers, regularizers, constraints, ``synchronized``, ``trainable``).
In inference mode the copy computes what the original computes. Which
branch a training call uses, and whether it updates the moving statistics,
is chosen around the call with ``official.split_batch_norm.batch_norm_mode``:
a functional model replays the arguments recorded when it was built, so
they cannot pass through its call.

``plain_model`` goes the other way, for export: every split BatchNorm becomes
an ordinary BatchNormalization holding the main branch, so the result loads
with plain Keras.

``logits_model`` and ``with_output_softmax`` take a classifier's final
softmax off (ConAdv's losses and attack take logits) and put it back on
export. Everything here uses Keras' public API.
"""

from __future__ import annotations

import keras

from official.split_batch_norm import BRANCHES, SplitBatchNormalization


class ConversionError(ValueError):
    """The model cannot be converted; the message is one line saying what to do."""


#: What a split BatchNorm takes from the BatchNormalization it replaces, and gives back.
_SHARED_ARGUMENTS = (
    "name",
    "trainable",
    "dtype",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
)


def _is_graph_model(model) -> bool:
    """Functional or Sequential: a model whose layers and their calls are recorded."""
    if isinstance(model, keras.Sequential):
        return True
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return False
    return isinstance(outputs, list) and all(isinstance(t, keras.KerasTensor) for t in outputs)


def _check_graph_model(model, what: str):
    if not _is_graph_model(model):
        raise ConversionError(
            f"{what} needs a functional or Sequential model; {type(model).__name__} is "
            "subclassed (no recorded graph): build it with the functional API, or put "
            "official.split_batch_norm.SplitBatchNormalization in it yourself"
        )
    if not model.built:
        raise ConversionError(
            f"model {model.name!r} is not built: give it an input shape "
            "(keras.Input) or call it once before converting"
        )


def _check_batch_norm(layer: keras.layers.BatchNormalization):
    ndim = layer.input_spec.ndim if layer.input_spec is not None else None
    if ndim is None or layer.axis % ndim != ndim - 1:
        raise ConversionError(
            f"BatchNormalization {layer.name!r} normalises axis {layer.axis} of {ndim}-D "
            "inputs: only channels-last is supported; build the model with "
            "data_format='channels_last'"
        )
    if getattr(layer, "renorm", False):
        raise ConversionError(
            f"BatchNormalization {layer.name!r} uses renorm, which split BatchNorm "
            "does not have; build it with renorm=False"
        )


def _shared_arguments(layer) -> dict:
    """The arguments a BatchNormalization and a split BatchNorm have in common, from one."""
    config = layer.get_config()
    return {key: config[key] for key in _SHARED_ARGUMENTS if key in config}


def _copy_batch_norm(source: keras.layers.BatchNormalization, target: SplitBatchNormalization):
    """Both branches start as the original: its γ, β and moving statistics."""
    for branch in BRANCHES:
        values = target.branch_variables(branch)
        for key in ("gamma", "beta", "moving_mean", "moving_variance"):
            if values[key] is not None:
                values[key].assign(getattr(source, key))


def split_batch_norm(model: keras.Model, group_size: int = 1) -> keras.Model:
    """A copy of ``model`` whose every BatchNormalization is a split BatchNorm.

    ``group_size`` is the replicas per batch statistic of the new layers
    (1: each replica's own batch, the paper's choice; 0: all replicas); a
    layer made with ``synchronized=True`` gets 0. Raises ``ConversionError``
    (one line) for what cannot be converted: a subclassed model, a model not
    yet built, a BatchNorm inside a layer that is not itself a model, a
    channels-first BatchNorm, or one with renorm.
    """
    _check_graph_model(model, "split_batch_norm")

    def replace(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            _check_batch_norm(layer)
            group = 0 if layer.synchronized else group_size
            new = SplitBatchNormalization(group_size=group, **_shared_arguments(layer))
            return new, _copy_batch_norm
        inner_layers = getattr(layer, "_flatten_layers", None)  # not on Keras ops (x + 2)
        hidden = [
            inner
            for inner in (inner_layers(include_self=False) if inner_layers else ())
            if isinstance(inner, keras.layers.BatchNormalization)
        ]
        if hidden:
            raise ConversionError(
                f"layer {layer.name!r} ({type(layer).__name__}) holds BatchNormalization "
                f"{hidden[0].name!r} inside its own call, where it cannot be replaced; "
                "make that part a functional model"
            )
        return None

    return _clone(model, replace)


def _copy_weights(source, target):
    if getattr(source, "weights", None):  # a Keras op (x + 2) has none
        target.set_weights(source.get_weights())
        # Layers that cache tensors computed from their weights (Normalization).
        if hasattr(target, "finalize_state"):
            target.finalize_state()


def _clone(model: keras.Model, replace) -> keras.Model:
    """``model`` cloned layer by layer (nested models too), weights copied.

    ``replace(layer)`` returns ``(new_layer, copy(source, target))`` for a layer
    to swap, or None to copy it as it is.
    """
    pairs = []

    def clone(layer):
        swap = replace(layer)
        if swap is None:
            new, copy = layer.__class__.from_config(layer.get_config()), _copy_weights
        else:
            new, copy = swap
        pairs.append((layer, new, copy))
        return new

    converted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for source, target, copy in pairs:
        copy(source, target)
    return converted


def _copy_main_branch(source: SplitBatchNormalization, target: keras.layers.BatchNormalization):
    main = source.branch_variables("main")
    for key in ("gamma", "beta", "moving_mean", "moving_variance"):
        if main[key] is not None:
            getattr(target, key).assign(main[key])


def plain_model(model: keras.Model) -> keras.Model:
    """A copy of ``model`` of ordinary Keras layers, every split BatchNorm its main branch.

    For a functional or Sequential model (a converted one, or one built with
    split BatchNorm), each ``SplitBatchNormalization`` becomes a
    ``keras.layers.BatchNormalization`` with its arguments and its main γ, β
    and moving statistics. The copy loads with ``keras.models.load_model``
    without custom objects and computes the main branch's inference output.
    """
    if not _is_graph_model(model):
        raise ConversionError(
            f"{type(model).__name__} is subclassed (no recorded graph) and cannot be "
            "rebuilt from ordinary layers; save its weights instead"
        )

    def replace(layer):
        if isinstance(layer, SplitBatchNormalization):
            new = keras.layers.BatchNormalization(
                axis=-1, synchronized=layer.group_size == 0, **_shared_arguments(layer)
            )
            return new, _copy_main_branch
        return None

    return _clone(model, replace)


# ------------------------------------------------------------ the final softmax


def final_layer(model: keras.Model):
    """The layer that computes a single-output model's output (inside nested models too), or
    None when a Keras op (``ops.log(x)``, ``x * 2``) computes it."""
    layer = model
    while _is_graph_model(layer):
        if len(layer.outputs) != 1:
            raise ConversionError(
                f"model {layer.name!r} has {len(layer.outputs)} outputs: ConAdv trains a "
                "classifier with one output (the class logits or probabilities)"
            )
        output, last = layer.outputs[0], layer.layers[-1]
        try:
            produced = last.output is output
        except (AttributeError, ValueError):  # a layer called more than once
            produced = False
        if not produced:
            return None
        layer = last
    return layer


def _is_softmax(activation) -> bool:
    return activation is keras.activations.softmax or (
        getattr(activation, "__name__", "") == "softmax"
    )


def _is_linear(activation) -> bool:
    return (
        activation is None
        or activation is keras.activations.linear
        or (getattr(activation, "__name__", "") == "linear")
    )


def _softmax_layer(layer) -> bool:
    """A layer that is only a softmax: ``Softmax`` or ``Activation("softmax")``."""
    if isinstance(layer, keras.layers.Softmax):
        if layer.axis not in (-1, [-1], (-1,)):
            raise ConversionError(
                f"Softmax layer {layer.name!r} normalises axis {layer.axis}: ConAdv's loss "
                "takes the class axis last; use keras.layers.Softmax(axis=-1)"
            )
        return True
    return isinstance(layer, keras.layers.Activation) and _is_softmax(layer.activation)


def logits_model(model: keras.Model) -> tuple[keras.Model, dict | None]:
    """``model`` with its final softmax taken off, and the final layer as it was (or None).

    A final ``Dense(..., activation="softmax")`` (keras.applications' default
    head) becomes linear; a final ``Softmax`` or ``Activation("softmax")``
    layer becomes ``keras.layers.Identity``: the copy outputs the logits the
    softmax took. A final activation that is not a softmax is refused. The
    second value, a serialized layer, is what ``with_output_softmax`` puts back.
    """
    last = final_layer(model) if _is_graph_model(model) else None
    if last is None:
        return model, None  # subclassed, or ending in an op: no final layer to see
    activation = getattr(last, "activation", None)
    if _softmax_layer(last):
        make = keras.layers.Identity(name=last.name, dtype=last.dtype_policy)
    elif _is_softmax(activation):
        config = last.get_config()
        config["activation"] = "linear"
        make = last.__class__.from_config(config)
    elif not _is_linear(activation):
        name = getattr(activation, "__name__", str(activation))
        raise ConversionError(
            f"model {model.name!r} ends in a {name} activation (layer {last.name!r}): ConAdv "
            "trains a softmax classifier; end the model in a linear or softmax layer"
        )
    else:
        return model, None
    original = keras.saving.serialize_keras_object(last)
    return _clone_with_final(model, last, make), original


def with_output_softmax(model: keras.Model, final: dict | None) -> keras.Model:
    """``model`` (from ``logits_model``, maybe converted since) with its final layer as it was."""
    if final is None:
        return model
    last = final_layer(model)
    return _clone_with_final(model, last, keras.saving.deserialize_keras_object(final))


def _clone_with_final(model, last, new_layer):
    def replace(layer):
        return (new_layer, _copy_weights) if layer is last else None

    return _clone(model, replace)
