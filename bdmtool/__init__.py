"""bdmtool: binarized diffusion models from PyTorch to a 1-bit LCE ``.tflite`` on Android.

The folders ``trainer/``, ``exporter/``, ``android_bench/`` and ``tools/`` are installed as
``bdmtool.trainer``, ``bdmtool.exporter``, ``bdmtool.android_bench`` and ``bdmtool.tools``.
"""

import os

# tf-keras (Keras 2) is what larq 0.14 and LCE 0.16 need; TensorFlow reads this once, at import.
# Every bdmtool module is imported through this package, so this runs before any TensorFlow import.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
