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
"""

from __future__ import annotations

import os

import tensorflow as tf

from input_pipeline import preprocessing
from official import resnet

KERAS_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
LABELS_FILE = "labels.txt"


class ServingModule(tf.Module):
    """The inference model behind the two serving signatures."""

    def __init__(self, model, image_size: int, class_names=None, top_k: int = 5):
        super().__init__(name="conadv_serving")
        self.model = model
        self.image_size = int(image_size)
        self.top_k = int(top_k)
        self.class_names = None if class_names is None else tf.constant(list(class_names))
        self.serve_encoded = tf.function(
            self._serve_encoded, input_signature=[tf.TensorSpec([None], tf.string, name="images")]
        )
        self.serve_pixels = tf.function(
            self._serve_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        )

    def _predict(self, images):
        logits = tf.cast(self.model(images, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits)
        scores, ids = tf.math.top_k(probabilities, k=self.top_k)
        outputs = {"probabilities": probabilities, "top_k_ids": ids, "top_k_scores": scores}
        if self.class_names is not None:
            outputs["top_k_names"] = tf.gather(self.class_names, ids)
        return outputs

    def _serve_encoded(self, images):
        pixels = tf.map_fn(
            lambda data: preprocessing.eval_from_bytes(data, self.image_size),
            images,
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32),
        )
        return self._predict(pixels)

    def _serve_pixels(self, images):
        pixels = tf.map_fn(
            lambda image: preprocessing.eval_from_pixels(image, self.image_size),
            images,
            fn_output_signature=tf.TensorSpec([self.image_size, self.image_size, 3], tf.float32),
        )
        return self._predict(pixels)


def export_model(model, export_dir: str, image_size: int, class_names=None) -> dict:
    """Writes ``model.keras``, ``saved_model/`` and (with names) ``labels.txt``; returns paths."""
    tf.io.gfile.makedirs(export_dir)
    plain = resnet.plain_inference_model(model)
    keras_path = os.path.join(export_dir, KERAS_FILE)
    plain.save(keras_path)
    num_classes = int(plain.output_shape[-1])
    module = ServingModule(plain, image_size, class_names, top_k=min(5, num_classes))
    saved_model_path = os.path.join(export_dir, SAVED_MODEL_DIR)
    tf.saved_model.save(
        module,
        saved_model_path,
        signatures={
            "serving_default": module.serve_encoded.get_concrete_function(),
            "serve_pixels": module.serve_pixels.get_concrete_function(),
        },
    )
    paths = {"keras": keras_path, "saved_model": saved_model_path}
    if class_names is not None:
        labels_path = os.path.join(export_dir, LABELS_FILE)
        with tf.io.gfile.GFile(labels_path, "w") as f:
            f.write("".join(f"{name}\n" for name in class_names))
        paths["labels"] = labels_path
    return paths
