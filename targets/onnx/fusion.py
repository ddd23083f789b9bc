"""Which weights onnxruntime multiplies in one kernel: a fact the lowering acts on and the latency predictor
prices (no onnx import, so that predicting a plan does not load the lowering)."""

from __future__ import annotations

from edgeq.core.plan import TensorPlan


def one_quantized_input(plans: list[TensorPlan]) -> bool:
    """Whether q, k and v read one quantized input: all static int8 over one calibrated range (one QuantizeLinear),
    or all int8_dyn (one DynamicQuantizeLinear). An encoder's three projections and its attention are then one
    QAttention (targets/onnx/encoder.py)."""
    if all(d.format == "int8_dyn" for d in plans):
        return True
    return all(d.format == "int8" and d.act_range is not None for d in plans) and \
        len({tuple(d.act_range) for d in plans}) == 1
