"""GGUF target: lowers IR + plan to a file stock llama.cpp loads."""

from edgeq.targets.gguf.writer import write_gguf

__all__ = ["write_gguf"]
