"""The backends edgeq lowers to, one folder each behind targets/base.Target (registry.py), and the device profiles."""
