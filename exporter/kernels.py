"""Which kernel the multi-bit (W1A8 / W1A4) layers of an export use, and what a checkpoint's padding allows.

TensorFlow-free, so `bdmtool export`'s preflight refuses a checkpoint before TensorFlow loads; the Keras side
(exporter/binary_layers.py) builds the layers these names choose.
"""

from __future__ import annotations

A8_KERNELS = ("int8", "bitplanes")  # kernels of multi-bit (W1A4, W1A8) layers
# The kernel when no flag chooses one: the exact bit planes (README, the W1A8 / W1A4 sections; docs/methods.md,
# "W1A8's default kernel").
MULTIBIT_DEFAULT = {"a8": "bitplanes", "a4": "bitplanes"}

# What each multi-bit kernel computes, in the export log and the sidecar (docs/methods.md: W1A8 as int8, bit planes).
KERNEL_FIDELITY = {
    "bitplanes": "exact: the +-1 bit planes compute the trained layers (float rounding only; the samples match "
                 "PyTorch's). LCE's bconv is fast ARM code; on x86 it is portable C++ and slow",
    "int8": "approximate: every layer's int8 output is re-quantized to 256 levels over calibrated ranges, which "
            "moves some strokes (FID +4.0 % on the shipped W1A8 student at N = 1,000); check yours with "
            "`bdmtool eval`. Builtin TFLite ops only, fast everywhere; bit planes are the exact path",
}


class NotExportableError(ValueError):
    """A layer marked binary cannot be expressed as an LCE binary convolution; says which and why."""


def multibit_kernel(abits: int, a8: str = MULTIBIT_DEFAULT["a8"], a4: str = MULTIBIT_DEFAULT["a4"]) -> str | None:
    """The kernel a layer with ``abits`` activation bits is exported with (None: not a multi-bit layer)."""
    return {8: a8, 4: a4}.get(abits)


def padding_refusal(binarize: dict | None, a8: str = MULTIBIT_DEFAULT["a8"],
                    a4: str = MULTIBIT_DEFAULT["a4"]) -> str | None:
    """Why a checkpoint's multi-bit padding cannot be exported on the requested kernel path (None: it can).

    Zero padding (``binarize.act_pad=zero``) is exact on the int8 path (zero point 0); bit planes are
    'same-one' bconvs, which reproduce only the top-level border the other mode trains with.
    """
    if not binarize or binarize.get("act_pad", "top") != "zero":
        return None
    bits = binarize["abits"]
    if multibit_kernel(bits, a8, a4) != "bitplanes":
        return None
    return (f"this W1A{bits} checkpoint was trained with zero padding (binarize.act_pad=zero, for the int8 path), "
            f"which --a{bits} bitplanes cannot reproduce: export with --a{bits} int8, or train with "
            "--set binarize.act_pad=top for bit planes")
