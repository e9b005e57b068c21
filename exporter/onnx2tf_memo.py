"""onnx2tf's per-operator numeric checks, evaluated incrementally instead of from the input every time.

In its default (strict) mode onnx2tf checks many operators it converts (Add, Mul, Reshape, the normalisations,
...) against ONNX Runtime: it builds a Keras functional model from the graph's inputs to the tensors just
converted and runs it on its dummy input (``dummy_tf_inference``). Each check builds and re-runs the whole
prefix of the graph, so the conversion is quadratic in the graph's depth: on the tiny U-Net (410 checks) these
re-runs were ~70 % of onnx2tf's time and the model constructions most of the rest.

``memoized_validation(onnx_path)`` is a context manager under which every such check evaluates only the layers
no check has evaluated before: each Keras tensor's value on a given dummy input is cached, a check walks back
from the tensors it asks for until it meets cached ones, and the check's "model" is a light object holding its
inputs and outputs (``_ValidationModel``) instead of a tf_keras functional model. onnx2tf's own code still
prepares the inputs, calls the same layers and compares the values, so it takes the same decisions: the tests
convert the same ONNX file with and without the cache and compare the ``.tflite`` files byte for byte in
``canonical_form`` (names blanked: they differ, and the converter orders constants by name). Keras tensors are
immutable, so a cached value cannot go stale when onnx2tf rewires a tensor: the rewired tensor is a new object
with its own entry.

It patches module attributes of onnx2tf 1.29.24 (the pinned version) for the duration of the ``with`` block
only, and does nothing on another version (the conversion is then as slow as before, and as correct). A check
whose evaluation raises is recorded (``failure``): onnx2tf swallows some such errors and carries on without the
check, so ``exporter.pipeline.onnx_to_keras`` then converts again without the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from collections import OrderedDict

import numpy as np

PINNED_ONNX2TF = "1.29.24"


class _Evaluator:
    """Values of Keras tensors on a few sets of input arrays, each computed once.

    onnx2tf checks most operators on the graph built so far, but some (Reshape, the normalisations) on a small
    stand-alone model with its own input; the few most recently used inputs keep their values.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self.by_input: OrderedDict[str, dict[int, tuple[object, object]]] = OrderedDict()
        self.values: dict[int, tuple[object, object]] = {}  # id -> (KerasTensor kept alive, value)
        self.checks = 0  # validation models evaluated
        self.layer_calls = 0  # layers run to evaluate them (without the cache: every layer of every prefix)
        self.failure: str | None = None  # the first evaluation that raised (onnx2tf may swallow it)

    def _select(self, model, inputs: dict) -> None:
        h = hashlib.sha1()
        for t in model.inputs:
            a = np.asarray(inputs[t.name])
            h.update(f"{t.name}|{a.dtype}|{a.shape}|{id(t)}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        key = h.hexdigest()
        self.values = self.by_input.setdefault(key, {})
        self.by_input.move_to_end(key)
        while len(self.by_input) > self.keep:
            self.by_input.popitem(last=False)

    def outputs(self, model, inputs: dict) -> list:
        import tensorflow as tf

        self._select(model, inputs)
        self.checks += 1
        for t in model.inputs:
            if id(t) not in self.values:
                self.values[id(t)] = (t, tf.cast(tf.convert_to_tensor(inputs[t.name]), t.dtype))
        return [self._value(t) for t in model.outputs]

    def _value(self, target):
        """Post-order walk from ``target`` back to cached tensors (iterative: graphs are deep)."""
        import tensorflow as tf

        stack = [target]
        while stack:
            kt = stack[-1]
            if id(kt) in self.values:
                stack.pop()
                continue
            hist = kt._keras_history
            node = hist.layer._inbound_nodes[hist.node_index]
            if node.is_input:  # what tf_keras.Model would refuse at construction
                raise ValueError(f"graph disconnected: {kt.name} is an input the check did not declare")
            missing = [p for p in node.keras_inputs if id(p) not in self.values]
            if missing:
                stack.extend(missing)
                continue
            stack.pop()
            flat = list(node._flat_arguments)
            for p, (_, index) in zip(node.keras_inputs, node._keras_inputs_ids_and_indices):
                flat[index] = self.values[id(p)][1]
            if node._single_positional_tensor_passed:
                args, kwargs = (flat[0],), {}
            else:
                args, kw = tf.nest.pack_sequence_as((node.call_args, node.call_kwargs.values()), flat)
                kwargs = dict(zip(node.call_kwargs.keys(), kw))
            out = node.layer(*args, **kwargs)
            self.layer_calls += 1
            for o_kt, o_val in zip(tf.nest.flatten(node.outputs), tf.nest.flatten(out)):
                self.values[id(o_kt)] = (o_kt, o_val)
        return self.values[id(target)][1]


class _ValidationModel:
    """What onnx2tf's checks use of ``tf_keras.Model(inputs=..., outputs=...)``: its inputs and outputs, and a
    call that evaluates the outputs through the shared cache (building a Keras functional model traverses the
    whole prefix of the graph again, the other quadratic cost)."""

    def __init__(self, inputs, outputs, evaluator: _Evaluator):
        import tensorflow as tf

        self.inputs, self.outputs = tf.nest.flatten(inputs), tf.nest.flatten(outputs)
        self._evaluator = evaluator

    @property
    def output(self):
        return self.outputs[0] if len(self.outputs) == 1 else self.outputs

    def __call__(self, inputs, training=False):
        try:
            out = self._evaluator.outputs(self, inputs)
        except Exception as e:
            # onnx2tf catches some of these and carries on without the check: the caller must know.
            self._evaluator.failure = self._evaluator.failure or f"{type(e).__name__}: {e}"
            raise
        return out if len(out) != 1 else out[0]


class _KerasWithValidationModels:
    """``tf_keras`` as onnx2tf's operator modules see it inside the block: ``Model(inputs=, outputs=)`` (the
    only way they build models, all for checks) gives a ``_ValidationModel``; everything else is tf_keras."""

    def __init__(self, real, evaluator: _Evaluator):
        self._real, self._evaluator = real, evaluator

    def __getattr__(self, name):
        return getattr(self._real, name)

    def Model(self, *args, **kwargs):  # noqa: N802 (tf_keras's name)
        if args or set(kwargs) != {"inputs", "outputs"}:
            return self._real.Model(*args, **kwargs)
        return _ValidationModel(kwargs["inputs"], kwargs["outputs"], self._evaluator)


def _operator_modules(onnx_path) -> list:
    """onnx2tf's helper module and the operator modules this graph needs, imported now (onnx2tf imports them
    lazily, per operator, and a module imported later would see the real tf_keras)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = ["onnx2tf.utils.common_functions"]
    names += [f"onnx2tf.ops.{op}" for op in sorted({n.op_type for n in graph.node} | {"Input"})]
    mods = []
    for name in names:
        try:
            mods.append(importlib.import_module(name))
        except ImportError:  # an operator onnx2tf does not have: its own error comes later, unchanged
            pass
    return mods


@contextlib.contextmanager
def memoized_validation(onnx_path):
    """Within the block, onnx2tf's checks on ``onnx_path`` evaluate each Keras tensor once per input.

    Yields the evaluator (its ``checks`` and ``layer_calls`` count the work; ``failure`` names the first check
    whose evaluation raised, which onnx2tf may have swallowed), or None on another onnx2tf.
    """
    import onnx2tf

    if getattr(onnx2tf, "__version__", None) != PINNED_ONNX2TF:
        yield None
        return
    evaluator = _Evaluator()
    patched = []
    for m in _operator_modules(onnx_path):
        real = getattr(m, "tf_keras", None)
        if real is not None and not isinstance(real, _KerasWithValidationModels):
            m.tf_keras = _KerasWithValidationModels(real, evaluator)
            patched.append((m, real))
    try:
        yield evaluator
    finally:
        for m, real in patched:
            m.tf_keras = real
