"""Converting a Keras model to split BatchNorm and back (``conadv.keras`` is the public face).

``split_batch_norm`` copies a functional or Sequential model (nested models
included) with every ``keras.layers.BatchNormalization`` replaced by the
project's ``SplitBatchNormalization``: a main branch (clean images, used for
evaluation and export) and an auxiliary branch (adversarial images), both
starting from the original's γ, β and moving statistics, with its momentum
and epsilon. In inference mode the copy computes what the original computes.
Which branch a training call uses, and whether it updates the moving
statistics, is chosen around the call with
``official.split_batch_norm.batch_norm_mode``: a functional model replays the
arguments recorded when it was built, so they cannot pass through its call.

``plain_model`` goes the other way, for export: every split BatchNorm becomes
an ordinary BatchNormalization holding the main branch, so the result loads
with plain Keras.
"""

from __future__ import annotations

import keras

from official import resnet
from official.split_batch_norm import BRANCHES, SplitBatchNormalization


class ConversionError(ValueError):
    """The model cannot be converted; the message is one line saying what to do."""


def _is_graph_model(model) -> bool:
    """Functional or Sequential: a model whose layers and their calls are recorded."""
    from keras.src.models.functional import Functional  # Keras 3 has no public alias

    return isinstance(model, (Functional, keras.Sequential))


def _check_batch_norm(layer: keras.layers.BatchNormalization):
    ndim = layer.input_spec.ndim if layer.input_spec is not None else None
    if ndim is None or layer.axis % ndim != ndim - 1:
        raise ConversionError(
            f"BatchNormalization {layer.name!r} normalises axis {layer.axis} of {ndim}-D "
            "inputs: only channels-last is supported; build the model with "
            "data_format='channels_last'"
        )
    if not (layer.center and layer.scale):
        raise ConversionError(
            f"BatchNormalization {layer.name!r} has center={layer.center}, "
            f"scale={layer.scale}: split BatchNorm trains both γ and β; use the defaults"
        )
    if getattr(layer, "renorm", False):
        raise ConversionError(
            f"BatchNormalization {layer.name!r} uses renorm, which split BatchNorm "
            "does not have; build it with renorm=False"
        )


def _copy_batch_norm(source: keras.layers.BatchNormalization, target: SplitBatchNormalization):
    """Both branches start as the original: its γ, β and moving statistics."""
    for branch in BRANCHES:
        values = target.branch_variables(branch)
        values["gamma"].assign(source.gamma)
        values["beta"].assign(source.beta)
        values["moving_mean"].assign(source.moving_mean)
        values["moving_variance"].assign(source.moving_variance)


def split_batch_norm(model: keras.Model, group_size: int = 1) -> keras.Model:
    """A copy of ``model`` whose every BatchNormalization is a split BatchNorm.

    ``group_size`` is the replicas per batch statistic of the new layers
    (1: each replica's own batch, the paper's choice; 0: all replicas); a
    layer made with ``synchronized=True`` gets 0. Raises ``ConversionError``
    (one line) for what cannot be converted: a subclassed model, a model not
    yet built, a BatchNorm inside a layer that is not itself a model, a
    channels-first BatchNorm, or one without γ or β.
    """
    if not _is_graph_model(model):
        raise ConversionError(
            f"split_batch_norm needs a functional or Sequential model; "
            f"{type(model).__name__} is subclassed (no recorded graph): build it with the "
            "functional API, or put official.split_batch_norm.SplitBatchNormalization "
            "in it yourself"
        )
    if not model.built:
        raise ConversionError(
            f"model {model.name!r} is not built: give it an input shape "
            "(keras.Input) or call it once before converting"
        )

    def replace(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            _check_batch_norm(layer)
            new = SplitBatchNormalization(
                momentum=layer.momentum,
                epsilon=layer.epsilon,
                group_size=0 if getattr(layer, "synchronized", False) else group_size,
                name=layer.name,
                dtype=layer.dtype_policy,
            )
            new.trainable = layer.trainable
            return new, _copy_batch_norm
        hidden = [
            inner
            for inner in layer._flatten_layers(include_self=False)
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
    if source.weights:
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
    target.gamma.assign(main["gamma"])
    target.beta.assign(main["beta"])
    target.moving_mean.assign(main["moving_mean"])
    target.moving_variance.assign(main["moving_variance"])


def plain_model(model: keras.Model) -> keras.Model:
    """A copy of ``model`` of ordinary Keras layers, every split BatchNorm its main branch.

    For a functional or Sequential model (a converted one, or one built with
    split BatchNorm), each ``SplitBatchNormalization`` becomes a
    ``keras.layers.BatchNormalization`` with its momentum, epsilon and main
    γ, β and moving statistics; a ResNet of ``official/resnet.py`` becomes its
    inference model. The copy loads with ``keras.models.load_model`` without
    custom objects and computes the main branch's inference output.
    """
    if isinstance(model, resnet.SplitBNResNet):
        return resnet.plain_inference_model(model)
    if not _is_graph_model(model):
        raise ConversionError(
            f"{type(model).__name__} is subclassed (no recorded graph) and cannot be "
            "rebuilt from ordinary layers; save its weights instead"
        )

    def replace(layer):
        if isinstance(layer, SplitBatchNormalization):
            new = keras.layers.BatchNormalization(
                axis=-1,
                momentum=layer.momentum,
                epsilon=layer.epsilon,
                name=layer.name,
                dtype=layer.dtype_policy,
            )
            new.trainable = layer.trainable
            return new, _copy_main_branch
        return None

    return _clone(model, replace)
