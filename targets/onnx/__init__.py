"""ONNX target: lowers IR + plan to an ONNX model onnxruntime runs (QDQ INT8, MatMulNBits 4/8-bit, f16, f32)."""
