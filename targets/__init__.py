"""Targets: one sub-package per backend (gguf/, later onnx/ and tvm/), plus the device profiles."""
