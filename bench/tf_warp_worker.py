"""TensorFlow Addons' ``sparse_image_warp`` timed on given inputs (run by bench_warp.py).

Runs inside the benchmark's own TensorFlow environment (``python -m bench warp --with-tf``
makes it), never imports speech2face, and is given its inputs as an ``.npz``:
``image (B, C, H, W)``, ``source``/``dest`` ``(B, N, 2)`` (row, col), ``weights`` (the
image-shaped tensor whose dot product with the output is the loss for the gradient).

Usage: ``python tf_warp_worker.py INPUTS.npz OUT.npz THREADS REPEATS``; prints one JSON
line of median and minimum milliseconds (wall and CPU) for eager and ``tf.function``.
"""

from __future__ import annotations

import json
import os
import sys

from common import timed_ms  # bench/common.py: this script's folder is sys.path[0]


def main(inputs: str, out: str, threads: int, repeats: int) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import tensorflow_addons as tfa

    data = np.load(inputs)
    image = tf.constant(data["image"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    source, dest = tf.constant(data["source"]), tf.constant(data["dest"])
    weights = tf.constant(data["weights"].transpose(0, 2, 3, 1))
    order, reg, boundary = (int(data["order"]), float(data["regularization"]),
                            int(data["boundary"]))

    def forward(d):
        warped, _ = tfa.image.sparse_image_warp(image, source, d, order, reg, boundary)
        return warped

    def gradient(d):
        with tf.GradientTape() as tape:
            tape.watch(d)
            loss = tf.reduce_sum(forward(d) * weights)
        return tape.gradient(loss, d)

    graph_forward = tf.function(forward)
    results = {
        "eager_forward": timed_ms(lambda: forward(dest).numpy(), repeats),
        "function_forward": timed_ms(lambda: graph_forward(dest).numpy(), repeats),
        "threads": threads, "tensorflow": tf.__version__, "addons": tfa.__version__,
    }
    np.savez(out, warped=forward(dest).numpy().transpose(0, 3, 1, 2),
             dest_gradient=gradient(dest).numpy())
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
