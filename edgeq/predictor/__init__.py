"""The latency predictor: profile a device once through its real runtime, then predict any plan's prefill,
decode and peak memory there, and plan under a latency budget.

- profile.py   the latency profile (what was measured on which device, versioned JSON, cached)
- design.py    the micro-models a profile measures (synthetic decoders or encoders, every format in every role)
- measure.py   exporting and timing them on a device (HIL `Device`), interleaved, with a noise verdict
- model.py     the fitted predictor: per-kernel table, other ops, a learned whole-call correction, memory
- workload.py  what a plan asks of the device (shapes, formats, layers) from a graph, a plan or a bundle
- predict.py   finding and checking a profile, predicting a bundle, a plan or a graph (manifest `predicted`)
- validate.py  held-out whole-model plans, predicted and measured side by side
- budget.py    the ILP's latency row (per-option milliseconds, the exact check)
"""
