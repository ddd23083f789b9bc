"""The one compile pipeline: options -> import + merge -> passes (decide.py) -> each target's lowering -> bundle."""
