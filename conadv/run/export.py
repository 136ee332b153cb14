"""The trained network as people serve it: a plain ``.keras`` file and a SavedModel.

Both hold the main branch only (moving statistics, ordinary Keras layers), so
they need nothing from this project to load. The SavedModel has two
signatures for TensorFlow Serving:

- ``serving_default``: a batch of encoded JPEG or PNG images (``tf.string``
  ``[N]``), given the evaluation preprocessing of the training data (centre
  crop of 0.875 and resize; small images are resized whole);
- ``serve_pixels``: a batch of uint8 pixel arrays ``[N, H, W, 3]`` of any one
  size, given the same preprocessing after decoding.

Each returns ``probabilities`` ``[N, C]``, ``top_k_ids`` and ``top_k_scores``
``[N, k]`` (k = 5, or C if smaller) and, when the dataset has class names,
``top_k_names``; the names are also written to ``labels.txt``.

The SavedModel is written by ``keras.export.ExportArchive``, not by saving a
``tf.Module`` that holds the model. A Keras 3 variable wraps a ``tf.Variable``;
saved through the model, each wrapper becomes a second variable in the graph
beside the one the signatures read. TensorFlow 2's loader relinks them, but
the session loader of TensorFlow Serving and ``saved_model_cli`` restores the
wrappers and then fails with "Could not find variable". The archive saves only
the variables the signatures capture, one graph variable each.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from input_pipeline import preprocessing
from official.model_conversion import plain_model

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.txt"


def serving_functions(model, image_size: int, class_names=None, top_k: int = 5):
    """(from encoded images, from uint8 pixels): the two signatures' bodies, untraced."""
    image_size = int(image_size)
    names = None if class_names is None else tf.constant(list(class_names))
    pixel_spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)

    def predict(pixels):
        logits = tf.cast(model(pixels, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits)
        scores, ids = tf.math.top_k(probabilities, k=top_k)
        outputs = {"probabilities": probabilities, "top_k_ids": ids, "top_k_scores": scores}
        if names is not None:
            outputs["top_k_names"] = tf.gather(names, ids)
        return outputs

    def serving(preprocess):
        def serve(images):
            pixels = tf.map_fn(
                lambda image: preprocess(image, image_size),
                images,
                fn_output_signature=pixel_spec,
            )
            return predict(pixels)

        return serve

    return serving(preprocessing.eval_from_bytes), serving(preprocessing.eval_from_pixels)


def write_saved_model(model, path: str, image_size: int, class_names=None, top_k: int = 5):
    """Writes the serving SavedModel of the Keras ``model`` to ``path``."""
    from_encoded, from_pixels = serving_functions(model, image_size, class_names, top_k)
    archive = keras.export.ExportArchive()
    archive.add_endpoint(
        "serving_default", from_encoded, [tf.TensorSpec([None], tf.string, name="images")]
    )
    archive.add_endpoint(
        "serve_pixels", from_pixels, [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]
    )
    archive.write_out(path, verbose=False)


def export_model(model, export_dir: str, image_size: int, class_names=None) -> dict:
    """Writes ``model.keras``, ``saved_model/`` and (with names) ``labels.txt``; returns paths."""
    tf.io.gfile.makedirs(export_dir)
    plain = plain_model(model)
    keras_path = os.path.join(export_dir, KERAS_FILE)
    plain.save(keras_path)
    num_classes = int(plain.output_shape[-1])
    saved_model_path = os.path.join(export_dir, SAVED_MODEL_DIR)
    write_saved_model(plain, saved_model_path, image_size, class_names, top_k=min(5, num_classes))
    paths = {"keras": keras_path, "saved_model": saved_model_path}
    if class_names is not None:
        labels_path = os.path.join(export_dir, LABELS_FILE)
        with tf.io.gfile.GFile(labels_path, "w") as f:
            f.write("".join(f"{name}\n" for name in class_names))
        paths["labels"] = labels_path
    return paths
