"""CNNs into the IR through torch.export: a module (with an example input) or a saved ExportedProgram (.pt2).

torch.export gives a flat ATen graph whose parameters carry their state_dict
names, so the IR keeps torch's names (`block.conv1.weight`). Batch norm (eval
statistics) is folded into the conv before it; every op outside the CNN
family is refused in one line naming the op and the module it came from.

Both the ops torch.export leaves by default (conv2d, batch_norm, linear,
flatten, hardtanh ...) and the usual core-ATen decompositions of the same
things (convolution, _native_batch_norm_legit_no_training, addmm of a
transposed weight, view, mean) are read, so a program saved after
`run_decompositions()` imports too.

`.pt2` files are untrusted: torch.export.load unpickles parts of an archive
(tensor subclasses, custom objects, sample inputs when a safe load fails) and
can load compiled libraries, so the archive is read once into memory (bounded),
checked to hold only JSON, raw tensor records and weights-only sample inputs,
and only then handed to torch from that same buffer.
"""

from __future__ import annotations

import io
import json
import logging
import operator
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.errors import EdgeqError
from edgeq.core.ir import Graph, Node, Tensor, Value
from edgeq.models.cnn import INPUT, OUTPUT, CnnConfig

MAX_PT2_BYTES = 1 << 30          # a CNN this compiler lowers is far smaller
MAX_PT2_ENTRIES = 100_000


def import_module(module, example, name: str = "cnn") -> Graph:
    """A torch module (exported in eval mode with `example`, one NCHW float32 batch) as a CNN graph."""
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(module, (torch.as_tensor(example, dtype=torch.float32),))
    except Exception as exc:  # noqa: BLE001 - torch's export errors are many and long; one line names the module
        raise EdgeqError(None, f"torch.export could not export {type(module).__name__}: "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    finally:
        module.train(was_training)
    return import_exported_program(ep, name=name)


def import_pt2(path: str | os.PathLike) -> Graph:
    """A `torch.export.save`d ExportedProgram, checked before torch reads it (see the module docstring)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise EdgeqError(path, "no such file")
    size = path.stat().st_size
    if size > MAX_PT2_BYTES:
        raise EdgeqError(path, f"is {size} bytes; edgeq reads .pt2 programs up to {MAX_PT2_BYTES} bytes")
    data = path.read_bytes()
    check_pt2_archive(data, path)
    with _TorchLogs() as logs:
        try:
            ep = torch.export.load(io.BytesIO(data))
        except Exception as exc:  # noqa: BLE001 - whatever torch raises, the user gets one line
            root = logs.errors[-1] if logs.errors else exc
            while root.__cause__ is not None:
                root = root.__cause__
            why = (str(root).strip().splitlines() or [type(root).__name__])[0]
            raise EdgeqError(path, f"torch.export.load failed: {type(root).__name__}: {why}") from None
    return import_exported_program(ep, name=path.stem, source=path)


class _TorchLogs(logging.Handler):
    """Holds what torch.export logs while loading (a traceback per failure) instead of printing it: edgeq reports
    one line, and the reason in it is the logged exception's."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def __enter__(self) -> "_TorchLogs":
        self.loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export")]
        self.saved = [(lg.propagate, lg.handlers) for lg in self.loggers]
        for lg in self.loggers:
            lg.handlers = [self]          # torch attaches its own stream handlers to these loggers
            lg.propagate = False
        return self

    def __exit__(self, *exc) -> None:
        for lg, (propagate, handlers) in zip(self.loggers, self.saved):
            lg.handlers = handlers
            lg.propagate = propagate


def check_pt2_archive(data: bytes, path) -> None:
    """Refuse anything in a .pt2 archive that torch would unpickle or execute; bound every size."""
    import torch

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise EdgeqError(path, f"not a torch.export archive (.pt2 is a zip file: {exc})") from None
    if len(infos) > MAX_PT2_ENTRIES:
        raise EdgeqError(path, f"archive has {len(infos)} entries (more than {MAX_PT2_ENTRIES})")
    if sum(i.file_size for i in infos) > MAX_PT2_BYTES:
        raise EdgeqError(path, f"archive unpacks to more than {MAX_PT2_BYTES} bytes")
    names = [i.filename for i in infos]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or not all("/" in n for n in names):
        raise EdgeqError(path, "not a torch.export archive (expected one root folder)")
    root = roots.pop() + "/"
    rel = {n[len(root):]: n for n in names}
    def read(r: str) -> bytes:
        try:
            return zf.read(rel[r])
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, ValueError,
                OSError) as exc:
            raise EdgeqError(path, f"archive entry {r!r} cannot be read ({exc})") from None

    if "archive_format" not in rel or read("archive_format").strip() != b"pt2":
        raise EdgeqError(path, "not a torch.export.save archive (no archive_format 'pt2'; older formats are pickles "
                               "and are refused)")
    plain = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")
    allowed = ("models/", "data/weights/", "data/constants/", "data/sample_inputs/", "extra/")
    for r in rel:
        if r.endswith("/") or r in plain:
            continue
        if not r.startswith(allowed):
            raise EdgeqError(path, f"archive entry {r!r} is not part of a plain ExportedProgram (compiled code and "
                                   "other payloads are refused)")
        if r.endswith(".pt") and not r.startswith("data/sample_inputs/"):
            raise EdgeqError(path, f"archive entry {r!r} is a pickle (legacy format); re-save with torch.export.save")
    models = [r for r in rel if r.startswith("models/") and r.endswith(".json")]
    if not models:
        raise EdgeqError(path, "archive holds no exported program (models/*.json)")
    for r in rel:
        if r.startswith("data/") and r.endswith(".json"):
            try:
                cfg = json.loads(read(r))
            except (ValueError, RecursionError) as exc:
                raise EdgeqError(path, f"{r} is not valid JSON ({exc})") from None
            for key, meta in (cfg.get("config") or {}).items() if isinstance(cfg, dict) else ():
                if not isinstance(meta, dict) or meta.get("use_pickle") or \
                        not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    raise EdgeqError(path, f"{r}: entry {key!r} is a pickled object or custom class (refused: "
                                           "edgeq never unpickles model files)")
    for r in rel:
        if r.startswith("data/sample_inputs/"):
            try:
                payload = read(r)
                torch.load(io.BytesIO(payload), weights_only=True)
            except EdgeqError:
                raise
            except Exception:  # noqa: BLE001 - anything a weights-only load refuses is refused
                raise EdgeqError(path, f"{r} is not a weights-only tensor file (refused: torch would unpickle it)") from None


# --- the graph -----------------------------------------------------------------

class _Importer:
    def __init__(self, ep, name: str, source):
        self.ep = ep
        self.source = source
        self.name = name
        self.sig = {s.arg.name: s for s in ep.graph_signature.input_specs}
        self.nodes: list[Node] = []
        self.weights: dict[str, np.ndarray] = {}
        self.value: dict[Any, str] = {}         # fx node -> IR value name (activations)
        self.param: dict[Any, tuple[str, np.ndarray]] = {}   # fx node -> (state_dict name, array), maybe transposed
        self.users: dict[Any, int] = {}
        self.tuple_of: dict[Any, Any] = {}      # fx getitem source (max_pool2d_with_indices, native bn)
        self.transposed: set = set()            # transposed weights (a decomposed linear's t(w))
        self.folded: set = set()                # batch norms folded into their conv

    def fail(self, node, what: str):
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, cls = list(stack.values())[-1]
            cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            where = f"module {path or '<root>'} ({cls.rsplit('.', 1)[-1]})"
        else:
            where = "the top-level module"
        raise EdgeqError(self.source, f"{what} in {where}: the CNN importer supports conv2d, batch_norm (after a conv), "
                                      "relu, relu6, max/avg/global pooling, flatten, linear and add")

    def tensor(self, target: str) -> np.ndarray:
        ep = self.ep
        t = ep.state_dict.get(target)
        if t is None:
            t = ep.constants.get(target)
        if t is None:
            raise EdgeqError(self.source, f"exported program has no data for {target}")
        return t.detach().to("cpu").float().numpy().copy()

    def run(self) -> Graph:
        fx = self.ep.graph
        for n in fx.nodes:
            self.users[n] = len(n.users)
        user_inputs = [n for n in fx.nodes if n.op == "placeholder" and self.sig[n.name].kind.name == "USER_INPUT"]
        if len(user_inputs) != 1:
            raise EdgeqError(self.source, f"a CNN takes one input (images); this program takes {len(user_inputs)}")
        img = user_inputs[0]
        shape = tuple(img.meta["val"].shape)
        if len(shape) != 4:
            raise EdgeqError(self.source, f"the input must be NCHW images; the program's input has shape {shape}")
        for n in fx.nodes:
            if n.op == "placeholder":
                spec = self.sig[n.name]
                if n is img:
                    self.value[n] = INPUT
                elif spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                    self.param[n] = (spec.target, None)
                else:
                    raise EdgeqError(self.source, f"unsupported program input {n.name} ({spec.kind.name})")
            elif n.op == "call_function":
                self.call(n)
            elif n.op == "output":
                outs = [a for a in n.args[0]]
                if len(outs) != 1 or outs[0] not in self.value:
                    raise EdgeqError(self.source, "a CNN returns one tensor (logits)")
                self.rename(self.value[outs[0]], OUTPUT)
            else:
                self.fail(n, f"unsupported graph node {n.op} {n.target}")
        out_shape = tuple(fx.output_node().args[0][0].meta["val"].shape)
        if len(out_shape) != 2:
            raise EdgeqError(self.source, f"a CNN's output must be (batch, classes); this one is {out_shape}")
        cfg = CnnConfig(in_channels=int(shape[1]), height=int(shape[2]), width=int(shape[3]),
                        n_classes=int(out_shape[1]), name=self.name)
        weights = {k: _const(k, v) for k, v in self.weights.items()}
        return Graph(arch="cnn", kind="cnn", config=cfg,
                     inputs=[Value(INPUT, ("batch", *cfg.image_shape), "f32")],
                     outputs=[Value(OUTPUT, ("batch", cfg.n_classes), "f32")],
                     nodes=self.nodes, weights=weights,
                     metadata={"name": self.name, "source_path": str(self.source) if self.source else None,
                               "license": None})

    def rename(self, old: str, new: str) -> None:
        for node in self.nodes:
            node.outputs = [new if o == old else o for o in node.outputs]
            node.inputs = [new if i == old else i for i in node.inputs]

    # helpers
    def act(self, n, arg) -> str:
        if arg not in self.value:
            self.fail(n, f"{_opname(n)} on a constant or unsupported value {getattr(arg, 'name', arg)!r}")
        return self.value[arg]

    def weight(self, n, arg) -> tuple[str, np.ndarray]:
        if arg not in self.param:
            self.fail(n, f"{_opname(n)} with a computed (not constant) weight")
        target, arr = self.param[arg]
        if arr is None:
            arr = self.tensor(target)
        return target, arr

    def emit(self, n, op: str, inputs: list[str], **attrs) -> str:
        out = n.name
        self.nodes.append(Node(op, inputs, [out], attrs))
        self.value[n] = out
        return out

    def add_weight(self, name: str, arr: np.ndarray) -> str:
        if name in self.weights:
            if not np.array_equal(self.weights[name], arr):
                raise EdgeqError(self.source, f"weight {name} is used twice with different values (a shared weight "
                                              "with batch norm folded in)")
            return name
        self.weights[name] = np.ascontiguousarray(arr, dtype=np.float32)
        return name

    def call(self, n) -> None:
        t = n.target
        name = _opname(n)
        args = list(n.args)
        kw = dict(n.kwargs)
        if t is operator.getitem:
            src, idx = args
            if src in self.tuple_of and idx == 0:
                self.value[n] = self.value[src]
                return
            if src in self.tuple_of:      # the indices of max_pool2d_with_indices, the saved stats of a bn
                if self.users[n]:
                    self.fail(n, f"use of output {idx} of {_opname(src)}")
                return
            self.fail(n, "getitem on an unsupported value")
        if name in ("conv2d", "convolution"):
            return self.conv(n, args, kw, name)
        if name in ("batch_norm", "_native_batch_norm_legit_no_training"):
            return self.batch_norm(n, args, kw, name)
        if name in ("relu", "relu_"):
            self.emit(n, "relu", [self.act(n, args[0])])
            return
        if name in ("hardtanh", "hardtanh_", "clamp", "relu6"):
            lo, hi = (0.0, 6.0) if name == "relu6" else (_arg(args, kw, 1, "min_val" if "hardtanh" in name else "min", -1.0),
                                                          _arg(args, kw, 2, "max_val" if "hardtanh" in name else "max", 1.0))
            if (lo, hi) == (0.0, 6.0) or (lo, hi) == (0, 6):
                self.emit(n, "relu6", [self.act(n, args[0])])
                return
            self.fail(n, f"unsupported op {name}({lo}, {hi}) (only relu6's clamp to [0, 6])")
        if name in ("max_pool2d", "max_pool2d_with_indices"):
            k = _pair(args[1])
            s = _pair(_arg(args, kw, 2, "stride", None) or k)
            p = _pair(_arg(args, kw, 3, "padding", 0))
            d = _pair(_arg(args, kw, 4, "dilation", 1))
            if d != (1, 1) or _arg(args, kw, 5, "ceil_mode", False):
                self.fail(n, "unsupported max_pool2d with dilation or ceil_mode")
            self.emit(n, "max_pool2d", [self.act(n, args[0])], kernel=k, stride=s, padding=p)
            if name == "max_pool2d_with_indices":
                self.tuple_of[n] = True
            return
        if name == "avg_pool2d":
            k = _pair(args[1])
            s = _pair(_arg(args, kw, 2, "stride", None) or k)
            p = _pair(_arg(args, kw, 3, "padding", 0))
            if _arg(args, kw, 4, "ceil_mode", False) or _arg(args, kw, 6, "divisor_override", None) is not None \
                    or (p != (0, 0) and not _arg(args, kw, 5, "count_include_pad", True)):
                self.fail(n, "unsupported avg_pool2d with ceil_mode, divisor_override or count_include_pad=False")
            self.emit(n, "avg_pool2d", [self.act(n, args[0])], kernel=k, stride=s, padding=p)
            return
        if name in ("adaptive_avg_pool2d", "_adaptive_avg_pool2d"):
            if tuple(_pair(args[1])) != (1, 1):
                self.fail(n, f"unsupported adaptive_avg_pool2d to {args[1]} (only global pooling, output 1x1)")
            self.emit(n, "global_avg_pool", [self.act(n, args[0])])
            return
        if name == "mean":
            dims = sorted(int(d) % 4 for d in _arg(args, kw, 1, "dim", []))
            if dims != [2, 3]:
                self.fail(n, f"unsupported mean over dims {dims} (only the spatial dims 2, 3)")
            x = self.act(n, args[0])
            if _arg(args, kw, 2, "keepdim", False):
                self.emit(n, "global_avg_pool", [x])
            else:
                pooled = n.name + "_pool"
                self.nodes.append(Node("global_avg_pool", [x], [pooled]))
                self.nodes.append(Node("flatten", [pooled], [n.name], {"start_dim": 1}))
                self.value[n] = n.name
            return
        if name == "flatten":
            start = _arg(args, kw, 1, "start_dim", 0)
            end = _arg(args, kw, 2, "end_dim", -1)
            rank = len(args[0].meta["val"].shape)
            if start % rank != 1 or end % rank != rank - 1:
                self.fail(n, f"unsupported flatten({start}, {end}) (only flatten from dim 1 to the end)")
            self.emit(n, "flatten", [self.act(n, args[0])], start_dim=1)
            return
        if name in ("view", "reshape", "_unsafe_view"):
            src, out = args[0].meta["val"].shape, n.meta["val"].shape
            if len(out) == 2 and out[0] == src[0]:
                self.emit(n, "flatten", [self.act(n, args[0])], start_dim=1)
                return
            if tuple(out) == tuple(src):
                self.value[n] = self.act(n, args[0])
                return
            self.fail(n, f"unsupported {name} to {tuple(out)} (only flattening to (batch, features))")
        if name in ("t", "permute", "transpose") and args[0] in self.param:
            target, arr = self.weight(n, args[0])
            if arr.ndim != 2:
                self.fail(n, f"unsupported {name} of weight {target}")
            self.param[n] = (target, arr.T)          # only ever read by addmm/mm below, as a decomposed linear
            self.transposed.add(n)
            return
        if name == "linear":
            x = self.act(n, args[0])
            wname, w = self.weight(n, args[1])
            inputs = [x, self.add_weight(wname, w)]
            b = _arg(args, kw, 2, "bias", None)
            if b is not None:
                bname, barr = self.weight(n, b)
                inputs.append(self.add_weight(bname, barr))
            self.emit(n, "linear", inputs)
            return
        if name in ("addmm", "mm"):
            bias = args[0] if name == "addmm" else None
            x, wt = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
            if wt not in self.transposed or _arg(args, kw, 3, "beta", 1) != 1 \
                    or _arg(args, kw, 4, "alpha", 1) != 1:
                self.fail(n, f"unsupported {name} (only x @ weight.T (+ bias), as a decomposed linear)")
            wname, w = self.param[wt]
            inputs = [self.act(n, x), self.add_weight(wname, w.T)]
            if bias is not None:
                bname, barr = self.weight(n, bias)
                inputs.append(self.add_weight(bname, barr))
            self.emit(n, "linear", inputs)
            return
        if name in ("add", "add_"):
            if _arg(args, kw, 2, "alpha", 1) != 1 or args[1] not in self.value:
                self.fail(n, "unsupported add (only the sum of two activations, e.g. a residual)")
            self.emit(n, "add", [self.act(n, args[0]), self.act(n, args[1])])
            return
        if name in ("dropout", "clone", "contiguous", "detach", "alias", "feature_dropout"):
            if name.endswith("dropout") and _arg(args, kw, 2, "train", False):
                self.fail(n, "dropout in training mode")
            self.value[n] = self.act(n, args[0])
            return
        self.fail(n, f"unsupported op {name}")

    def conv(self, n, args, kw, name) -> None:
        x = self.act(n, args[0])
        wname, w = self.weight(n, args[1])
        b = _arg(args, kw, 2, "bias", None)
        stride = _pair(_arg(args, kw, 3, "stride", 1))
        padding = _arg(args, kw, 4, "padding", 0)
        if isinstance(padding, str):
            self.fail(n, f"unsupported conv2d padding {padding!r} (give explicit padding)")
        padding = _pair(padding)
        dilation = _pair(_arg(args, kw, 5, "dilation", 1))
        if name == "convolution":
            if _arg(args, kw, 6, "transposed", False):
                self.fail(n, "unsupported transposed convolution")
            groups = int(_arg(args, kw, 8, "groups", 1))
        else:
            groups = int(_arg(args, kw, 6, "groups", 1))
        if w.ndim != 4:
            self.fail(n, f"unsupported {w.ndim - 2}-D convolution")
        bias = self.weight(n, b)[1] if b is not None else np.zeros(w.shape[0], np.float32)
        # batch norm right after, and read by nothing else: folded in
        users = list(n.users)
        if len(users) == 1 and _opname(users[0]) in ("batch_norm", "_native_batch_norm_legit_no_training"):
            w, bias = self.fold(users[0], w, bias)
            self.folded.add(users[0])
        conv = wname.removesuffix(".weight")
        self.emit(n, "conv2d", [x, self.add_weight(wname, w), self.add_weight(conv + ".bias", bias)],
                  stride=stride, padding=padding, dilation=dilation, groups=groups)

    def fold(self, bn, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        name = _opname(bn)
        a, kw = list(bn.args), dict(bn.kwargs)
        if name == "batch_norm":
            if _arg(a, kw, 5, "training", False):
                self.fail(bn, "batch_norm in training mode (export the module in eval mode)")
            eps = float(_arg(a, kw, 7, "eps", 1e-5))
        else:
            eps = float(_arg(a, kw, 6, "eps", 1e-5))
        c = w.shape[0]
        get = lambda i: self.weight(bn, a[i])[1].astype(np.float64) if a[i] is not None else None  # noqa: E731
        gamma, beta, mean, var = get(1), get(2), get(3), get(4)
        gamma = np.ones(c) if gamma is None else gamma
        beta = np.zeros(c) if beta is None else beta
        s = gamma / np.sqrt(var + eps)
        w2 = (w.astype(np.float64) * s[:, None, None, None]).astype(np.float32)
        b2 = ((b.astype(np.float64) - mean) * s + beta).astype(np.float32)
        return w2, b2

    def batch_norm(self, n, args, kw, name) -> None:
        if n not in self.folded:
            self.fail(n, "batch_norm that does not directly follow a conv (only folded batch norm is supported)")
        src = args[0]
        self.value[n] = self.value[src]
        if name == "_native_batch_norm_legit_no_training":
            self.tuple_of[n] = True


def import_exported_program(ep, name: str = "cnn", source=None) -> Graph:
    return _Importer(ep, name, source).run()


def _const(name: str, arr: np.ndarray) -> Tensor:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    arr.setflags(write=False)
    return Tensor(name, tuple(int(s) for s in arr.shape), load=lambda a=arr: a)


def _opname(n) -> str:
    t = n.target
    if t is operator.getitem:
        return "getitem"
    s = getattr(t, "__name__", str(t))          # "conv2d.default"
    packet = getattr(t, "_overloadpacket", None)
    if packet is not None:
        return getattr(packet, "__name__", s).split(".")[-1]
    return s.split(".")[0]


def _arg(args: list, kwargs: dict, i: int, key: str, default):
    if i < len(args):
        return args[i]
    return kwargs.get(key, default)


def _pair(v) -> tuple[int, int]:
    """torch's int-or-list attributes as (h, w); callers replace torch's empty-list defaults first."""
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))
