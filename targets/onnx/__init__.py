"""ONNX target: lowers IR + plan to an ONNX model onnxruntime runs (QDQ INT8, f16, f32)."""

from edgeq.targets.onnx.lower import lower_onnx, save_model

__all__ = ["lower_onnx", "save_model"]
