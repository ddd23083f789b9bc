"""Native executables a bundle carries so a device runs it with nothing installed (no Python, no libraries).

`llama_source` finds and unpacks the llama.cpp sources llama-cpp-python vendors and says how to cross-build them
for aarch64 (the qemu-arm64 device builds its shared libraries from them too); `runner` builds llama.cpp
statically and edgeq's own runner (`edgeq_run.cpp`) over it, once per edgeq and llama.cpp version, into a cache.
"""
