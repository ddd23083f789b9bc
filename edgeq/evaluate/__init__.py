"""Fidelity of a bundle in its own runtime against the float source model (KLD/PPL/top-1, cosine, agreement)."""
