"""Loads an exported SavedModel with TensorFlow alone and runs both signatures.

Imports nothing but TensorFlow (and the standard library), as a serving
host would. Usage: python tests/serving_check_program.py SAVED_MODEL IMAGES_DIR
where IMAGES_DIR holds 0.jpg, 1.jpg, ...; prints RESULT {json}.
"""

import json
import os
import sys

import tensorflow as tf


def main(saved_model, images_dir):
    loaded = tf.saved_model.load(saved_model)
    encoded_fn = loaded.signatures["serving_default"]
    pixels_fn = loaded.signatures["serve_pixels"]
    names = sorted(os.listdir(images_dir), key=lambda n: int(n.split(".")[0]))
    data = [open(os.path.join(images_dir, n), "rb").read() for n in names]
    from_bytes = encoded_fn(images=tf.constant(data))
    from_pixels = [
        pixels_fn(images=tf.io.decode_jpeg(d, channels=3)[None])["top_k_ids"][0].numpy().tolist()
        for d in data
    ]
    out = {
        "signatures": sorted(loaded.signatures.keys()),
        "outputs": sorted(from_bytes.keys()),
        "bytes_top_k": from_bytes["top_k_ids"].numpy().tolist(),
        "pixels_top_k": from_pixels,
        "names": [[n.decode() for n in row] for row in from_bytes["top_k_names"].numpy()],
        "probability_sums": from_bytes["probabilities"].numpy().sum(axis=1).tolist(),
    }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
