"""onnxruntime as an edgeq runtime backend: encoders (`embed`), decoders (`OnnxDecoderBackend`, the same
feed/logits interface as llama.cpp's, under `Session`) and any ONNX bundle (`run`). No torch.

Sessions use ORT_ENABLE_ALL, so QDQ pairs become integer kernels at load time;
`allow_spinning` is off by default because idle spinning threads steal cores on
small devices (and make timings bimodal).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeq.core.errors import RequestError
from edgeq.runtime.lora import HeldAdapter, LoraFactorStore, checked_factors
from edgeq.runtime.manifest import BundleError, listed_path, lora_adapters
from edgeq.runtime.onnx_slice import slice_mlp
from edgeq.runtime.pruned import pruned_file
from edgeq.runtime.text_io import SentenceEmbedding, TokenizerText
from edgeq.runtime.tokenizer import build_tokenizer

NAME = "onnx"
RUNTIME_DIST = "onnxruntime"
REMOTE = False
SLICE_VERSION = 2          # of runtime/onnx_slice.py's output: part of a narrowed file's cache key


def open_decoder(bundle, manifest: dict, art: dict, spec, n_ctx: int, threads: int, device: str | None,
                 pruning=None):
    model = listed_path(bundle, manifest, art["path"], "model")
    if pruning is None:
        return OnnxDecoderBackend(model, spec, n_ctx=n_ctx, threads=threads,
                                  arena=not lora_adapters(manifest, NAME))
    recipe = (manifest.get("onnx") or {}).get("pruning")
    if pruning.bias is not None:
        raise BundleError(bundle / "manifest.json", "down-projection biases in the pruning table (--prune-compensate): "
                                                    "ONNX bundles do not carry them")
    if not recipe:
        raise BundleError(bundle, "the manifest has no onnx pruning recipe for its pruning rates")
    attention = None if pruning.qk is None else {"qk": pruning.qk, "v": pruning.v}
    with pruned_file(art["sha256"], pruning, ".onnx", SLICE_VERSION,
                     lambda path: slice_mlp(model, path, pruning.widths, pruning.full, recipe, attention)) as path:
        return OnnxDecoderBackend(path, spec, n_ctx=n_ctx, threads=threads)


def open_model(bundle, manifest: dict, art: dict, threads: int, device: str | None):
    return OnnxSession(bundle, manifest, art, threads=threads)


def op_latency(backend, args: dict, threads: int) -> dict:
    """Per-kernel timings of the calls runtime/latency.py times (runtime/onnx_ops.py)."""
    from edgeq.runtime.onnx_ops import op_latency as timed

    return timed(backend, args, threads, session_options)


def model_op_latency(session, args: dict, threads: int) -> dict:
    """Per-kernel timings of an encoder's or CNN's calls runtime/latency.py times (runtime/onnx_ops.py)."""
    from edgeq.runtime.onnx_ops import model_op_latency as timed

    return timed(session, args, threads, session_options)


def session_options(threads: int = 1, spinning: bool = False, arena: bool = True):
    """The runtime's session settings. `arena=False`: tensors from the C heap instead of onnxruntime's CPU arena,
    which keeps the most any run needed and grows by powers of two. Measured on an int4 SmolLM2 with LoRA inputs
    (a 256-token prompt, bench/adapters.py's probe): feeding a rank-16 adapter grew the arena by 58 MiB, three
    times the adapter's file; without the arena 3 MiB, and decode and prefill as fast, interleaved."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    return so


def open_session(model_path: str | os.PathLike, threads: int = 1, spinning: bool = False, arena: bool = True):
    import onnxruntime as ort

    return ort.InferenceSession(os.fspath(model_path), session_options(threads, spinning, arena),
                                providers=["CPUExecutionProvider"])


class OnnxSession(SentenceEmbedding):
    """A loaded ONNX bundle. Encoders: `embed(texts)`; every kind: `run(inputs)` (raw onnxruntime feeds)."""

    backend_name = "onnx"

    def __init__(self, bundle: Path, manifest: dict[str, Any], artifact: dict[str, Any], threads: int = 1,
                 spinning: bool = False):
        self.bundle = bundle
        self.manifest = manifest
        self.artifact = artifact
        self.threads = threads
        self.kind = manifest["model"]["kind"]
        self.model_path = listed_path(bundle, manifest, artifact["path"], "model")
        self.session = open_session(self.model_path, threads, spinning)
        self.tokenizer = None
        tok = manifest.get("tokenizer") or {}
        if tok.get("tokenizer_json"):
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(listed_path(bundle, manifest, tok["tokenizer_json"],
                                                                 "tokenizer.tokenizer_json")))
            self.tokenizer.no_padding()
            self.tokenizer.enable_truncation(int(tok.get("max_length", 512)))
            self.pad_id = int(tok.get("pad_id", 0))

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("this bundle has no tokenizer")
        return self.tokenizer.encode(text).ids

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, inputs)))

    def embed_ids(self, batch: list[list[int]]) -> np.ndarray:
        """Embeddings of tokenised sentences, padded to the longest in the batch."""
        n = max(len(x) for x in batch)
        ids = np.full((len(batch), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), n), dtype=np.int64)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        return self.session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> "OnnxSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OnnxDecoderBackend(TokenizerText):
    """A decoder graph with a KV cache (edgeq/targets/onnx/decoder.py) behind `Session`'s backend interface.

    `feed` appends tokens: the cache is the previous call's `present.N.*`
    outputs, given back as `past_key_values.N.*` through an IO binding (onnxruntime's tensors, no numpy copy
    of the cache per step; the graph's Concat still writes a new, longer cache each step: a fixed-size cache
    updated in place would need another graph). Tokenization is edgeq's own
    (the bundle's tokenizer spec, llama.cpp's rules), so ids match the GGUF
    artifact of the same model.
    """

    name = "onnx"

    def __init__(self, model_path: str | os.PathLike, spec, n_ctx: int, threads: int = 1, spinning: bool = False,
                 arena: bool = True):
        """`arena=False` for a graph fed LoRA adapters (see `session_options`)."""
        import onnxruntime as ort

        self.model_path = os.fspath(model_path)
        self.session = open_session(model_path, threads, spinning, arena)
        self.n_ctx = n_ctx
        self.spec = spec
        self.tok = build_tokenizer(spec)
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_shape = [(int(i.shape[1]), int(i.shape[3])) for i in past]
        self.n_vocab = int(self.session.get_outputs()[0].shape[-1])
        # LoRA inputs (bundles exported with --adapter-mode separate): weight -> (in, out); overridable
        # initializers of rank 0 (the base) unless fed
        lora = self.session.get_overridable_initializers()
        self.lora_shapes = {i.name[: -len(".lora_A")]: (int(i.shape[0]), 0) for i in lora
                            if i.name.endswith(".lora_A")}
        for i in lora:
            if i.name.endswith(".lora_B") and i.name[: -len(".lora_B")] in self.lora_shapes:
                w = i.name[: -len(".lora_B")]
                self.lora_shapes[w] = (self.lora_shapes[w][0], int(i.shape[1]))
        self._lora = LoraFactorStore(self._read_adapter)
        self.lora_feeds: dict = {}           # input name -> OrtValue over the fed array (made once per switch)
        self._io = self.session.io_binding()
        self._ones = np.ones((1, n_ctx), np.int64)                       # attention masks and positions: views
        self._positions = np.arange(n_ctx, dtype=np.int64)[None]
        self._step_logits = (ort.OrtValue.ortvalue_from_shape_and_type([1, 1, self.n_vocab], np.float32)
                             if self.session.get_outputs()[0].type == "tensor(float)" else None)
        self.reset()

    def set_adapters(self, chosen: list[tuple[str, float]], open_file: Callable[[str], Path]) -> None:
        """Feed these adapters (name, scale) to the graph's LoRA inputs (runtime/lora.py's LoraFactorStore: one
        adapter its file's arrays, several their factors side by side, so their deltas add); the graph's rank-0
        defaults where none applies. `open_file` checks a file against the manifest each time it is read."""
        if chosen and not self.lora_shapes:
            raise BundleError(None, "this ONNX model has no LoRA inputs (not exported with --adapter-mode separate)")
        import onnxruntime as ort

        feeds = {}
        for w, (a, b) in self._lora.select(chosen, open_file).items():
            # OrtValues over the arrays themselves (no copy), made here: making 420 of them took 5 ms, per token
            feeds[f"{w}.lora_A"], feeds[f"{w}.lora_B"] = (ort.OrtValue.ortvalue_from_numpy(x) for x in (a, b))
        self.lora_feeds = feeds
        self.reset()

    def _read_adapter(self, path: Path) -> HeldAdapter:
        """An .onnx_adapter file (onnxruntime's format), its tensors checked against the graph's LoRA inputs. The
        factors are views of the adapter object's own buffer (the file's bytes, read once), which is kept with
        them: copying them out cost as much as reading the file."""
        import onnxruntime as ort

        try:
            adapter = ort.AdapterFormat.read_adapter(os.fspath(path))
            params = {k: v.numpy() for k, v in adapter.get_parameters().items()}
        except Exception as exc:       # onnxruntime's flatbuffer verifier: a damaged or foreign file
            raise BundleError(path, f"not an onnxruntime adapter file ({str(exc).strip().splitlines()[0]})") from None
        return HeldAdapter(checked_factors(path, params, self.lora_shapes, ("A", "B")), owner=adapter)

    def reset(self) -> None:
        import onnxruntime as ort

        self.past = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, h, 0, d), np.float32)) for h, d in self.kv_shape]
        self.n_tokens = 0

    def _run(self, ids: list[int]):
        """Run the graph on the new tokens through an IO binding: the cache goes in and comes out as
        onnxruntime's own tensors (OrtValues), never through numpy; the logits (an OrtValue) are returned for
        the caller to copy if it wants them."""
        n = len(ids)
        if n == 0:
            raise RequestError("no tokens to feed")
        if self.n_tokens + n > self.n_ctx:
            raise RequestError(f"context overflow: {self.n_tokens + n} tokens > n_ctx {self.n_ctx}",
                               code="context_length_exceeded")
        inputs = {"input_ids": np.asarray([ids], np.int64), "attention_mask": self._ones[:, :self.n_tokens + n],
                  "position_ids": self._positions[:, self.n_tokens:self.n_tokens + n]}
        if self.lora_feeds:
            # an IO binding cannot name initializers (the graph's LoRA inputs are): OrtValues in and out instead
            import onnxruntime as ort

            feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in inputs.items()}
            feeds.update(self.lora_feeds)
            feeds.update(zip(self.past_names, self.past))
            out = self.session.run_with_ort_values(["logits", *self.present_names], feeds)
        else:
            io = self._io
            io.clear_binding_inputs()
            io.clear_binding_outputs()
            for name, arr in inputs.items():
                io.bind_cpu_input(name, arr)
            for name, value in zip(self.past_names, self.past):
                io.bind_ortvalue_input(name, value)
            if n == 1 and self._step_logits is not None:       # a decode step writes into the same logits buffer
                io.bind_ortvalue_output("logits", self._step_logits)
            else:
                io.bind_output("logits", "cpu")
            for name in self.present_names:
                io.bind_output(name, "cpu")
            self.session.run_with_iobinding(io)
            out = io.get_outputs()
        self.past = list(out[1:])
        self.n_tokens += n
        return out[0]

    def feed(self, ids: list[int], logits: bool = True) -> np.ndarray | None:
        """Append tokens to the KV cache; logits after the last one (None without `logits`)."""
        out = self._run(list(ids))
        # a copy: numpy() views the OrtValue's memory, which the next step reuses
        return np.array(out.numpy()[0, -1], dtype=np.float32) if logits else None

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of a fresh sequence, shape (len(ids), n_vocab)."""
        self.reset()
        out = self._run(list(ids))
        self.reset()
        return np.array(out.numpy()[0], dtype=np.float32)

    def close(self) -> None:
        self.session = None
        self.past = []
