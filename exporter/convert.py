"""Keras model -> LCE flatbuffer, through LCE's saved-model path, with TensorFlow's chatter kept out of the way.

``convert(model, log)`` returns the flatbuffer bytes; converter warnings (e.g. LCE falling back to its graphdef
path, which writes no I/O signature) are passed to ``log`` as one line each instead of Python warnings.
"""

from __future__ import annotations

import warnings

import bdmtool  # noqa: F401


def convert(model, log=print) -> bytes:
    import larq_compute_engine as lce
    import tensorflow as tf

    tf_logger = tf.get_logger()
    level = tf_logger.level
    tf_logger.setLevel("ERROR")  # the saved-model round trip logs a harmless 'compiled metrics' warning
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fb = lce.convert_keras_model(model)
    finally:
        tf_logger.setLevel(level)
    for w in caught:
        log(f"[lce] converter: {w.message}")
    return fb
