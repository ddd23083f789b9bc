"""TVM target: IR + plan -> Relax -> a library per device profile, run by the TVM runtime (Relax VM).

A TVM artifact is two files: the compiled library (`.so`, or a `.tar` of objects for
Android without an NDK) and its weights (`params.safetensors`), which the entry
function takes as parameters after the model inputs. Decoders (issue 6) reuse the
build (`build.py`) and bundle (`edgeq.export_tvm`) code with their own lowering.
"""
