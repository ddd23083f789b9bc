"""TVM target: IR + plan -> Relax -> a library per device profile, run by the TVM runtime (Relax VM); target.py."""
