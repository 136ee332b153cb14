"""ConAdv for any Keras image model: the split-BatchNorm conversion.

    import conadv.keras
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10,
                                        classifier_activation=None)
    split = conadv.keras.split_batch_norm(model)

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
"""

from __future__ import annotations

import keras

from official.split_batch_norm import (
    BRANCHES,
    SplitBatchNormalization,
    batch_norm_mode,
)

__all__ = ["ConversionError", "batch_norm_mode", "split_batch_norm"]


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
    pairs = []

    def clone(layer):
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
        else:
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
            new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new))
        return new

    converted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for source, target in pairs:
        if isinstance(target, SplitBatchNormalization):
            _copy_batch_norm(source, target)
        elif source.weights:
            target.set_weights(source.get_weights())
            # Layers that cache tensors computed from their weights (Normalization).
            if hasattr(target, "finalize_state"):
                target.finalize_state()
    return converted
