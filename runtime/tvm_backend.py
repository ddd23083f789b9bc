"""The TVM runtime (Relax VM) as an edgeq runtime backend: encoders (`embed`) and CNNs (`run`). No torch.

A TVM library is native code: loading it runs it (dlopen). Its SHA-256 in the manifest is what stands between
a user and arbitrary code, so the library is never loaded from the bundle: it is copied into a private folder
while its bytes are hashed, and that copy is loaded (or uploaded to the RPC server) only if the hash matches,
whether or not `load(verify=...)` checked the bundle first.

The device is local (`cpu`) or a TVM RPC server (`rpc://host:port`, how phones and
boards are reached): the library is uploaded there, the weights are copied to the
remote device once, and calls run remotely. `time()` uses the runtime's own time
evaluator on the device, so remote timings exclude the network.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime.manifest import BundleError, Pruning, listed_path, private_dir, remove_private_dir, verified_copy
from edgeq.runtime.text_io import SentenceEmbedding
from edgeq.runtime.tvm_decoder import TvmDecoderBackend

NAME = "tvm"
RUNTIME_DIST = "apache-tvm"
REMOTE = True          # the library also runs on a TVM RPC server (`device="rpc://HOST:PORT"`)


def open_model(bundle, manifest: dict, art: dict, threads: int, device: str | None, pruning: Pruning | None = None):
    return TvmSession(bundle, manifest, art, threads=threads, device=device, pruning=pruning)


def open_decoder(bundle, manifest: dict, art: dict, spec, n_ctx: int, threads: int, device: str | None,
                 pruning: Pruning | None = None):
    """At a pruning rate the same library runs (its MLP widths are symbolic) on the MLP weights sliced at load."""
    return TvmDecoderBackend(open_model(bundle, manifest, art, threads, device, pruning), spec, n_ctx)

MAX_BATCH = 1024


def parse_device(device: str | None) -> tuple[str, str | None, int | None]:
    """`cpu` / None -> local; `rpc://host:port` -> remote."""
    if device in (None, "", "cpu", "local"):
        return "local", None, None
    if device.startswith("rpc://"):
        host, _, port = device[len("rpc://"):].rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise BundleError(None, f"bad device {device!r}: expected rpc://HOST:PORT")
        return "rpc", host, int(port)
    raise BundleError(None, f"unknown device {device!r}: expected cpu or rpc://HOST:PORT")


def _check_section(spec: dict, path: Path) -> None:
    """The manifest's `tvm` section, as this runtime reads it (the manifest itself has no checksum)."""
    for key in ("library", "params", "entry", "inputs", "param_names"):
        if key not in spec:
            raise BundleError(path, f"tvm section lacks {key!r}")
    ok = isinstance(spec["entry"], str) and isinstance(spec["param_names"], list) and \
        all(isinstance(n, str) for n in spec["param_names"])
    for io in [*(spec["inputs"] if isinstance(spec["inputs"], list) else [None]), *(spec.get("outputs") or [])]:
        ok = ok and isinstance(io, dict) and isinstance(io.get("name"), str) and (
            io is not None and ("shape" not in io or (isinstance(io["shape"], list) and all(
                isinstance(d, (int, str)) and not isinstance(d, bool) for d in io["shape"]))))
    for io in spec["inputs"] if isinstance(spec["inputs"], list) else []:
        ok = ok and isinstance(io, dict) and isinstance(io.get("dtype"), str) and "shape" in io
    if not ok:
        raise BundleError(path, "tvm section is malformed (entry, inputs, outputs or param_names)")


def load_params(path: Path, names: list[str], cuts: dict[str, tuple[int, int]] | None = None) -> list[np.ndarray]:
    """The parameters in call order; `cuts` {name: (axis, length)}: read only that prefix of those (pruning)."""
    from safetensors import SafetensorError, safe_open

    cuts = cuts or {}
    out = []
    try:
        with safe_open(str(path), framework="np") as f:
            have = set(f.keys())
            for n in names:
                if n not in have:
                    raise BundleError(path, f"weights file lacks parameter {n}")
                if n not in cuts:
                    out.append(f.get_tensor(n))
                    continue
                axis, keep = cuts[n]
                view = f.get_slice(n)
                shape = view.get_shape()
                if not 0 <= axis < len(shape) or not 0 < keep <= shape[axis]:
                    raise BundleError(path, f"parameter {n} {shape} cannot keep {keep} along axis {axis}")
                out.append(np.ascontiguousarray(view[(slice(None),) * axis + (slice(0, keep),)]))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(path, f"not a readable safetensors file ({exc})") from None
    missing = set(cuts) - set(names)
    if missing:
        raise BundleError(path, f"the pruning recipe names {sorted(missing)[0]}, which the library does not take")
    return out


def pruning_cuts(bundle: Path, spec: dict, pruning: Pruning) -> dict[str, tuple[int, int]]:
    """{parameter: (axis, elements kept)} at the rate's widths, from the manifest's `tvm.pruning` recipe."""
    recipe = spec.get("pruning")
    if pruning.bias is not None:
        raise BundleError(bundle / "manifest.json", "down-projection biases in the pruning table (--prune-compensate): "
                                                    "TVM bundles do not carry them")
    if pruning.qk is not None:
        raise BundleError(bundle / "manifest.json", "attention widths in the pruning table: the TVM library's head "
                                                    "size is fixed (only ONNX bundles prune attention)")
    if not recipe or len(recipe) != len(pruning.widths):
        raise BundleError(bundle / "manifest.json", "the tvm section has no pruning recipe for its pruning rates")
    cuts = {}
    for layer, (items, k) in enumerate(zip(recipe, pruning.widths)):
        for it in items:
            keep = Fraction(k) * Fraction(int(it["per_channel"][0]), int(it["per_channel"][1]))
            if keep.denominator != 1:
                raise BundleError(bundle, f"width {k} of layer {layer} splits an element of {it['param']}")
            cuts[it["param"]] = (int(it["axis"]), int(keep))
    return cuts


class TvmSession(SentenceEmbedding):
    """A loaded TVM bundle. Encoders: `embed(texts)`; every kind: `run(inputs)`; `time(inputs)` on the device."""

    backend_name = "tvm"

    def __init__(self, bundle: Path, manifest: dict[str, Any], artifact: dict[str, Any], threads: int = 1,
                 device: str | None = None, pruning: Pruning | None = None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.bundle = bundle
        self.manifest = manifest
        self.artifact = artifact
        self.threads = threads
        self.kind = manifest["model"]["kind"]
        spec = manifest.get("tvm") or {}
        _check_section(spec, bundle / "manifest.json")
        self.entry = spec["entry"]
        self.inputs = spec["inputs"]
        self.outputs = spec.get("outputs") or [{"name": "output"}]
        mode, host, port = parse_device(device)
        gpu = (spec.get("target") or {}).get("kind") == "cuda"
        if gpu:       # the library carries CUDA source; this registers the compiler TVM calls when loading it
            import tvm.support.nvcc  # noqa: F401
        self.device_name = device or "cpu"
        self.remote = None
        private = private_dir("edgeq-tvm-lib-")
        try:
            lib_path = verified_copy(bundle, manifest, spec["library"], "tvm.library", private)
            if mode == "local":
                _set_threads(threads)
                if spec.get("int8_kernels") == "amx" and not request_amx():
                    raise BundleError(bundle / spec["library"], "its int8 linears use Intel AMX tiles, which this "
                                      "machine or OS does not grant (Linux >= 5.16 on an AMX CPU); re-export it here")
                try:
                    lib = tvm.runtime.load_module(str(lib_path))
                except Exception as exc:   # a library for another ISA (arm64 on x86, or a .tar of objects)
                    raise BundleError(bundle / spec["library"], f"cannot be loaded on this machine "
                                      f"({str(exc).splitlines()[0]}); run it on its device, e.g. "
                                      "device='rpc://HOST:PORT'") from None
                self.dev = tvm.cuda(0) if gpu else tvm.cpu(0)
            else:
                from tvm import rpc

                try:
                    self.remote = rpc.connect(host, port)
                except Exception as exc:
                    raise BundleError(None, f"cannot reach the TVM RPC server at {host}:{port} "
                                            f"({str(exc).splitlines()[0]})") from None
                self.remote.upload(str(lib_path))
                lib = self.remote.load_module(lib_path.name)
                self.dev = self.remote.cuda(0) if gpu else self.remote.cpu(0)
        finally:     # a loaded library stays mapped; its file is no longer needed
            remove_private_dir(private)
        self.vm = VirtualMachine(lib, self.dev)
        names = list(spec["param_names"])
        self.param_names = names
        cuts = pruning_cuts(bundle, spec, pruning) if pruning is not None else None
        self.params = [tvm.runtime.tensor(a, self.dev) for a in
                       load_params(listed_path(bundle, manifest, spec["params"], "tvm.params"), names, cuts)]
        self.tokenizer = None
        tok = manifest.get("tokenizer") or {}
        if tok.get("tokenizer_json"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(listed_path(bundle, manifest, tok["tokenizer_json"],
                                                                 "tokenizer.tokenizer_json")))
            self.tokenizer.no_padding()
            self.tokenizer.enable_truncation(int(tok.get("max_length", 512)))
            self.pad_id = int(tok.get("pad_id", 0))
        cfg = manifest["model"].get("config") or {}
        self.vocab_size = cfg.get("vocab_size")

    def _args(self, inputs: dict[str, np.ndarray]) -> list:
        import tvm

        args = []
        for spec in self.inputs:
            if spec["name"] not in inputs:
                raise RequestError(f"missing input {spec['name']!r} "
                                   f"(the model takes {[s['name'] for s in self.inputs]})")
            x = np.ascontiguousarray(inputs[spec["name"]], dtype=spec["dtype"])
            if x.ndim != len(spec["shape"]):
                raise RequestError(f"input {spec['name']!r} has {x.ndim} dimensions, the model takes "
                                   f"{spec['shape']}")
            for got, want in zip(x.shape, spec["shape"]):
                if isinstance(want, int) and got != want:
                    raise RequestError(f"input {spec['name']!r} has shape {x.shape}, the model takes "
                                       f"{spec['shape']}")
            args.append(tvm.runtime.tensor(x, self.dev))
        return args + self.params

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.vm[self.entry](*self._args(inputs))
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return {spec["name"]: o.numpy() for spec, o in zip(self.outputs, outs)}

    def time(self, inputs: dict[str, np.ndarray], number: int = 10, repeat: int = 5) -> dict[str, float]:
        """Latency of one call measured on the device by the TVM runtime's time evaluator (ms)."""
        f = self.vm.time_evaluator(self.entry, self.dev, number=number, repeat=repeat)
        res = f(*self._args(inputs))
        results = [float(r) * 1e3 for r in res.results]
        return {"median_ms": float(np.median(results)), "min_ms": float(min(results)), "mean_ms": float(res.mean * 1e3),
                "number": number, "repeat": repeat, "device": self.device_name}

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this bundle has no tokenizer")
        return self.tokenizer.encode(text).ids

    def encoder_inputs(self, batch: list[list[int]]) -> dict[str, np.ndarray]:
        if not batch or len(batch) > MAX_BATCH:
            raise RequestError(f"batch of {len(batch)} sentences (1..{MAX_BATCH})")
        n = max(len(x) for x in batch)
        ids = np.full((len(batch), n), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(batch), n), dtype=np.int32)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        if self.vocab_size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise RequestError(f"token id out of range of the vocabulary ({self.vocab_size})")
        return {"input_ids": ids, "attention_mask": mask}

    def embed_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Embeddings of tokenised sentences, padded to the longest in the batch."""
        return self.run(self.encoder_inputs(batch))["embedding"]

    def close(self) -> None:
        self.vm = None
        self.params = []
        self.remote = None

    def __enter__(self) -> "TvmSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.cache
def request_amx() -> bool:
    """Ask Linux for the AMX tile state for this process (x86-64 Linux >= 5.16; a no-op once granted). False when
    it is refused or the platform has no such request: an AMX kernel would then fault (targets/tvm/amx.py's kernels)."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(arch_prctl, req_xcomp_perm, xtiledata) == 0
    except (OSError, AttributeError):
        return False


def _set_threads(threads: int) -> None:
    """TVM's thread pool size for this process (parallel loops only; untuned kernels are mostly serial).

    Unless the user set them: workers are not pinned to cores (TVM_BIND_THREADS=0) and sleep between parallel loops
    instead of spinning (TVM_THREAD_POOL_SPIN_COUNT=0), as onnxruntime's threads (unpinned; the ONNX backend's
    sessions with allow_spinning=0). Pinned, a worker whose core another process holds stalls every parallel loop
    until the scheduler gives that core back: MiniLM int8-dyn at 2 threads on a shared 2-core machine (load 10)
    took 85 ms a call (median of 150) pinned, 11.5 ms unpinned, interleaved with onnxruntime's 10-25 ms."""
    import tvm

    os.environ.setdefault("TVM_NUM_THREADS", str(max(1, int(threads))))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(1, max(1, int(threads)))
