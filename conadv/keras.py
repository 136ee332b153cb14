"""ConAdv for any Keras image model: one import, one wrapper, and ``fit``.

Algorithm 1 (and DisAdv, and vanilla training) inside Keras' ``fit``, with the
split BatchNorm of §3.2 put into the user's model.

    import keras
    import conadv.keras

    net = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10,
                                      classifier_activation=None)
    model = conadv.keras.ConAdvModel(net, method="conadv", staleness=1, attack_eps=4.0)
    model.compile(optimizer=conadv.keras.LARS(0.1), metrics=["accuracy"])
    # precise statistics at the end (training images, unaugmented, in 100 batches)
    model.fit(train_dataset, epochs=10,
              callbacks=[conadv.keras.PreciseBatchNorm(train_eval_dataset, 100)])
    model.export_model().save("model.keras")   # plain Keras, main branch

- ``ConAdvModel`` (``conadv/keras_fit/``): vanilla, DisAdv or ConAdv
  steps of ``main.py`` inside ``fit``.
- ``split_batch_norm`` / ``plain_model`` (``official/model_conversion.py``):
  a model's BatchNorm layers to split BatchNorm, and back.
- ``PreciseBatchNorm`` (``conadv/keras_fit/batch_norm_callbacks.py``): a callback
  that recomputes the main branch's BatchNorm statistics (``ConAdvModel.precise_bn``)
  when ``fit`` ends, and before each validation if asked; ``fit`` warns once when
  it ends with moving statistics that still hold much of their initial values.
- ``batch_norm_mode``: chooses the branch of every split BatchNorm a call reaches.
- ``LARS``: the project's LARS (MLPerf semantics) as a Keras optimizer.
"""

from conadv.keras_fit.batch_norm_callbacks import PreciseBatchNorm
from conadv.keras_fit.model import ConAdvModel
from official.lars import LARS
from official.model_conversion import ConversionError, plain_model, split_batch_norm
from official.split_batch_norm import batch_norm_mode

__all__ = [
    "LARS",
    "ConAdvModel",
    "ConversionError",
    "PreciseBatchNorm",
    "batch_norm_mode",
    "plain_model",
    "split_batch_norm",
]
