"""merge_adapters: fold PEFT LoRA adapters into the float base weights, before any quantization.

For every module an adapter targets, W += weight · scale · B·A with
scale = lora_alpha / r (lora_alpha / √r with use_rslora), the r and alpha of
rank_pattern / alpha_pattern where they name the module. The merge is lazy
and per tensor: the merged tensor's loader is the base loader plus the deltas,
so an export still streams one tensor at a time and only the IR's view of the
weights changes. Which modules an adapter targets follows PEFT exactly
(target_modules as a regex or as name suffixes, exclude_modules,
layers_to_transform with layers_pattern), and the weights file must hold
exactly those modules, with shapes that fit the base model.

What cannot be merged into plain weights yet is refused with one line naming
the file: DoRA, modules_to_save, resized vocabularies, LoRA biases, and
adapters whose modules or shapes do not fit the base model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.core.adapter import ADAPTER_NAME, LoraAdapter, SparseAdapter, UserAdapter, check_adapter_name
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import sha256_file
from edgeq.core.ir import Graph, Tensor
from edgeq.core.plan import Plan
from edgeq.importers.hub import looks_like_hub_id, resolve_hub_id
from edgeq.importers.safetensors_io import FLOAT_DTYPES, SafetensorsFile, STensor
from edgeq.models import names
from edgeq.passes.base import Context, Pass
from edgeq.passes.sparse_adapters import SparseModule, is_sparse, sparse_modules

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_PATTERN_CHARS = 1000

# The Linear modules of a llama-family model (PEFT's "all-linear" leaves out the output head).
_LAYER_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Config fields PEFT would act on that have no meaning for plain merged weights.
_REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora) adapters are not supported yet",
    "lora_bias": "LoRA biases (lora_bias) are not supported yet",
    "use_qalora": "QALoRA (use_qalora) adapters are not supported yet",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported yet",
}
_REFUSED_VALUES = {
    "modules_to_save": "modules_to_save ({}) is not supported yet: the adapter replaces whole modules",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters ({}) is not supported",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported yet",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) cannot be merged into the weights",
    "arrow_config": "Arrow routing (arrow_config) cannot be merged into the weights",
}
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?(?P<weight>\.weight)?$")


@dataclass
class LoraModule:
    module: str                 # PEFT's module name, e.g. model.layers.0.self_attn.q_proj
    target: str                 # the canonical weight it changes
    embedding: bool             # nn.Embedding LoRA: delta = (B·A)ᵀ
    A: STensor
    B: STensor
    r: int
    alpha: float
    scale: float                # alpha/r or alpha/√r, before the adapter's weight

    def delta(self, weight: float) -> np.ndarray:
        a, b = self.A.load(), self.B.load()
        d = b @ a
        if self.embedding:
            d = d.T
        return d * np.float32(weight * self.scale)


@dataclass
class Adapter:
    path: Path
    weight: float
    config: dict[str, Any]
    modules: list[LoraModule] = field(default_factory=list)
    # Full base weights PEFT saved beside the LoRA (save_embedding_layers): loading the adapter puts them
    # in place of the base model's, so the merge starts from them too.
    base_layers: dict[str, STensor] = field(default_factory=dict)
    sha256: str = ""
    config_sha256: str = ""
    name: str = ""              # DIR=NAME, else the folder's name

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {"name": self.name, "sha256": self.sha256, "config_sha256": self.config_sha256,
                **({"peft_type": "SHIRA"} if is_sparse(c) else {}),
                "weight": self.weight, "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora")), "modules": len(self.modules),
                "base_model_name_or_path": c.get("base_model_name_or_path")}


def parse_adapter_arg(arg: str) -> tuple[str, float]:
    """`DIR` or `DIR:WEIGHT` (a trailing `:number`; a path may itself contain colons)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            w = float(tail)
        except ValueError:
            return arg, 1.0
        if not math.isfinite(w):
            raise EdgeqError(head, f"adapter weight {tail!r} is not a finite number")
        return head, w
    return arg, 1.0


def parse_adapter_spec(arg: str) -> tuple[str, float, str | None]:
    """`DIR[:WEIGHT][=NAME]`: the folder, its weight and the name it is listed under (None: the folder's). An
    `=` that is part of an existing path is left alone."""
    head, sep, tail = arg.rpartition("=")
    name = None
    if sep and head and ADAPTER_NAME.match(tail) and not Path(arg).expanduser().exists():
        arg, name = head, tail
    path, weight = parse_adapter_arg(arg)
    return path, weight, name


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise EdgeqError(path, "missing: a PEFT adapter folder needs adapter_config.json")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise EdgeqError(path, f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EdgeqError(path, f"not valid JSON ({exc})") from None
    if not isinstance(c, dict):
        raise EdgeqError(path, "not a JSON object")
    return c


def _check_config(c: dict[str, Any], path: Path) -> None:
    ptype = c.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        raise EdgeqError(path, f"peft_type {ptype!r} is not supported (LORA adapters are)")
    for key, why in _REFUSED_FLAGS.items():
        if c.get(key):
            raise EdgeqError(path, why)
    for key, why in _REFUSED_VALUES.items():
        v = c.get(key)
        if v:
            raise EdgeqError(path, why.format(", ".join(map(str, v)) if isinstance(v, list) else v))
    if c.get("bias", "none") != "none":
        raise EdgeqError(path, f"bias={c.get('bias')!r} is not supported (the adapter trains base-model biases)")
    r = c.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise EdgeqError(path, f"r must be a positive integer, not {r!r}")
    alpha = c.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise EdgeqError(path, f"lora_alpha must be a number, not {alpha!r}")
    tm = c.get("target_modules")
    if not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise EdgeqError(path, f"target_modules must be a regex or a list of module names, not {tm!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        v = c.get(key) or {}
        if not isinstance(v, dict) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                              for x in v.values()):
            raise EdgeqError(path, f"{key} must map module patterns to positive numbers")
        if key == "rank_pattern" and not all(isinstance(x, int) for x in v.values()):
            raise EdgeqError(path, "rank_pattern ranks must be integers")
    ltt = c.get("layers_to_transform")
    if ltt is not None and not (isinstance(ltt, int) or (isinstance(ltt, list) and all(isinstance(i, int) for i in ltt))):
        raise EdgeqError(path, f"layers_to_transform must be an integer or a list of integers, not {ltt!r}")
    ex, lp = c.get("exclude_modules"), c.get("layers_pattern")
    if ex is not None and not (isinstance(ex, str) or (isinstance(ex, list) and all(isinstance(e, str) for e in ex))):
        raise EdgeqError(path, f"exclude_modules must be a regex or a list of module names, not {ex!r}")
    if lp is not None and not (isinstance(lp, str) or (isinstance(lp, list) and all(isinstance(p, str) for p in lp))):
        raise EdgeqError(path, f"layers_pattern must be a string or a list of strings, not {lp!r}")
    patterns = [(k, v) for k in ("target_modules", "exclude_modules") if isinstance(v := c.get(k), str)]
    patterns += [("layers_pattern", p) for p in ([lp] if isinstance(lp, str) else lp or [])]
    patterns += [(key, p) for key in ("rank_pattern", "alpha_pattern") for p in (c.get(key) or {})]
    _compile_patterns(patterns, path)


def _compile_patterns(patterns: list[tuple[str, str]], path: Path) -> None:
    """Every (field, pattern) PEFT would compile, compiled here first: a bad one is one line, not re.error."""
    for key, p in patterns:
        if len(p) > MAX_PATTERN_CHARS:
            raise EdgeqError(path, f"{key} pattern of {len(p)} characters (more than {MAX_PATTERN_CHARS})")
        try:
            re.compile(p)
        except (re.error, RecursionError, OverflowError) as exc:
            raise EdgeqError(path, f"{key} {p!r} is not a valid regular expression ({exc})") from None


def adapter_config(folder: Path) -> dict[str, Any]:
    """An adapter folder's adapter_config.json, read bounded and checked (what `load_adapter` accepts)."""
    c = _read_config(folder)
    _check_config(c, folder / CONFIG)
    return c


# --- which modules PEFT targets ---------------------------------------------------

def model_modules(graph: Graph) -> dict[str, tuple[str, bool]]:
    """PEFT module name -> (canonical weight it changes, is an embedding), for a llama-family graph."""
    cfg = graph.config
    out: dict[str, tuple[str, bool]] = {"model.embed_tokens": (names.EMBED, True)}
    for i in range(cfg.n_layers):
        for leaf in _LAYER_LINEAR:
            m = f"model.layers.{i}.{leaf}"
            out[m] = (m + ".weight", False)
    # With tied embeddings lm_head's weight is the embedding table: a LoRA on lm_head changes both.
    out["lm_head"] = (names.head(cfg.tied_embeddings), False)
    return out


def _targeted(c: dict[str, Any], key: str) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists, for the config fields edgeq accepts."""
    ex = c.get("exclude_modules")
    if ex:
        if isinstance(ex, str):
            if re.fullmatch(ex, key):
                return False
        elif key in ex or any(key.endswith("." + e) for e in ex):
            return False
    tm = c["target_modules"]
    if isinstance(tm, str) and tm.lower() == "all-linear":
        tm = sorted({leaf.rsplit(".", 1)[-1] for leaf in _LAYER_LINEAR})
    if isinstance(tm, str):
        return re.fullmatch(tm, key) is not None
    if key in tm:
        return True
    found = any(key.endswith("." + t) for t in tm)
    ltt = c.get("layers_to_transform")
    using = ltt is not None and (len(ltt) != 0 if isinstance(ltt, list) else True)
    if using and found:
        pattern = c.get("layers_pattern")
        match = None
        if not pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for p in [pattern] if isinstance(pattern, str) else pattern:
                match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
                if match is not None:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == ltt if isinstance(ltt, int) else idx in ltt
    return found


def _pattern_value(patterns: dict[str, Any], key: str, default):
    """peft.utils.other.get_pattern_key: the first pattern matching the end of the module name."""
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default


# --- loading ---------------------------------------------------------------------

def load_adapter(arg: str | tuple[str, float], graph: Graph) -> Adapter:
    """Validate an adapter folder against the base graph; nothing is loaded but headers and the config."""
    path_s, weight, listed_as = parse_adapter_spec(arg) if isinstance(arg, str) else (*arg, None)
    folder = Path(path_s).expanduser()
    if not folder.exists() and looks_like_hub_id(path_s):
        folder = resolve_hub_id(path_s, "adapter")
    if not folder.exists():
        raise EdgeqError(folder, "no such adapter folder (nor a Hugging Face id org/name[@revision])")
    if not folder.is_dir():
        raise EdgeqError(folder, "is not a folder (a PEFT adapter is a folder with adapter_config.json and "
                                 "adapter_model.safetensors)")
    c = _read_config(folder)
    if is_sparse(c):
        return _load_sparse(folder, c, graph, weight, listed_as)
    _check_config(c, folder / CONFIG)
    cpath = folder / CONFIG
    wpath = folder / WEIGHTS
    if not wpath.is_file():
        other = " (found adapter_model.bin: only safetensors adapters are read)" if (folder / "adapter_model.bin").exists() else ""
        raise EdgeqError(wpath, f"missing{other}")
    st = SafetensorsFile(wpath)
    base = c.get("base_model_name_or_path")
    base_hint = f" (the adapter was trained on {base})" if base else ""

    modules = model_modules(graph)
    parts: dict[str, dict[str, STensor]] = {}      # module -> {"A": ..., "B": ...}
    kinds: dict[str, str] = {}                     # module -> lora_A or lora_embedding_A (for its error message)
    base_layers: dict[str, STensor] = {}
    for key, t in st.tensors.items():
        name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
        if name.endswith(".base_layer.weight") and name[:-len(".base_layer.weight")] in modules:
            module = name[:-len(".base_layer.weight")]
            target = modules[module][0]
            _check_vocab_rows(module, t, graph, wpath)
            if t.shape != graph.weights[target].shape or t.dtype not in FLOAT_DTYPES:
                raise EdgeqError(wpath, f"{key} has shape {t.shape} {t.dtype}, the base weight {target} "
                                        f"{graph.weights[target].shape}{base_hint}")
            if target in base_layers:
                base_layers[target] = _same_tensor(base_layers[target], t, wpath)
            else:
                base_layers[target] = t
            continue
        m = _KEY.match(name)
        if m is None:
            if "lora_magnitude_vector" in name:
                raise EdgeqError(wpath, "DoRA adapters (lora_magnitude_vector) are not supported yet")
            if ".modules_to_save." in name or name.endswith(".weight") and name.rsplit(".", 1)[0] in modules:
                module = name.split(".modules_to_save.")[0] if ".modules_to_save." in name else name.rsplit(".", 1)[0]
                _check_vocab_rows(module, t, graph, wpath)
                raise EdgeqError(wpath, f"holds full weights for {module} (modules_to_save), which is not supported yet")
            if ".lora_B." in name and name.endswith(".bias") or name.endswith("lora_B.bias"):
                raise EdgeqError(wpath, "LoRA biases (lora_bias) are not supported yet")
            raise EdgeqError(wpath, f"unexpected tensor {key}")
        if t.dtype not in FLOAT_DTYPES:
            raise EdgeqError(wpath, f"tensor {key} has dtype {t.dtype}, expected a float type")
        module, kind = m.group("module"), m.group("kind")
        slot = kind[-1]
        if slot in parts.setdefault(module, {}):
            raise EdgeqError(wpath, f"two {kind} tensors for {module} (several adapters in one file?)")
        parts[module][slot] = t
        kinds[module] = kind

    targeted = [name for name in modules if _targeted(c, name)]
    if not targeted:
        raise EdgeqError(cpath, f"target_modules {c['target_modules']!r} matches no module of the base model{base_hint}")
    for module in parts:
        if module not in modules:
            raise EdgeqError(wpath, f"has LoRA weights for {module}, which the base model does not have{base_hint}")
        if module not in targeted:
            raise EdgeqError(wpath, f"has LoRA weights for {module}, which adapter_config.json's target_modules "
                                    "does not select")
    rank_p, alpha_p = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    out: list[LoraModule] = []
    for module in targeted:
        got = parts.get(module)
        if not got or "A" not in got or "B" not in got:
            which = "lora_A and lora_B" if not got else ("lora_A" if "A" not in got else "lora_B")
            raise EdgeqError(wpath, f"has no {which} for {module}, which adapter_config.json targets")
        target, is_emb = modules[module]
        if kinds[module].startswith("lora_embedding") != is_emb:
            raise EdgeqError(wpath, f"{module} has {kinds[module]} tensors, which do not fit a "
                                    f"{'nn.Embedding' if is_emb else 'nn.Linear'} module")
        r = int(_pattern_value(rank_p, module, c["r"]))
        alpha = float(_pattern_value(alpha_p, module, c["lora_alpha"]))
        A, B = got["A"], got["B"]
        base_shape = graph.weights[target].shape
        # nn.Linear: A (r, in), B (out, r); nn.Embedding: A (r, vocab), B (dim, r), delta (B·A)ᵀ
        want_out, want_in = (base_shape[1], base_shape[0]) if is_emb else base_shape
        if module in ("model.embed_tokens", "lm_head"):
            rows = A.shape[1] if is_emb else B.shape[0]
            if len(A.shape) == 2 and len(B.shape) == 2 and rows != graph.config.vocab_size:
                raise EdgeqError(wpath, f"{module} LoRA has {rows} vocabulary rows, the base model "
                                        f"{graph.config.vocab_size}: resized vocabularies are not supported yet")
        if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[1] != want_in or B.shape[0] != want_out \
                or A.shape[0] != B.shape[1]:
            raise EdgeqError(wpath, f"{module}: lora_A {A.shape} and lora_B {B.shape} do not fit the base weight "
                                    f"{target} of shape {base_shape}{base_hint}")
        if A.shape[0] != r:
            raise EdgeqError(wpath, f"{module}: rank {A.shape[0]} in the weights, adapter_config.json says r={r}")
        scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
        out.append(LoraModule(module, target, is_emb, A, B, r, alpha, scale))
    return Adapter(path=folder, weight=weight, config=c, modules=out, base_layers=base_layers,
                   sha256=sha256_file(wpath),
                   config_sha256=sha256_file(cpath),
                   name=check_adapter_name(listed_as, folder) if listed_as else folder.resolve().name)


def _load_sparse(folder: Path, c: dict[str, Any], graph: Graph, weight: float, listed_as: str | None) -> Adapter:
    """A SHiRA folder: its config checked as PEFT would read it, its sparse deltas against the base."""
    cpath = folder / CONFIG
    for key in ("modules_to_save", "layers_to_transform"):
        if c.get(key):
            raise EdgeqError(cpath, f"{key} is not supported for SHiRA adapters")
    tm = c.get("target_modules")
    if not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
        raise EdgeqError(cpath, f"target_modules must be a regex or a list of module names, not {tm!r}")
    ex = c.get("exclude_modules")
    if ex is not None and not (isinstance(ex, str) or (isinstance(ex, list) and all(isinstance(e, str) for e in ex))):
        raise EdgeqError(cpath, f"exclude_modules must be a regex or a list of module names, not {ex!r}")
    _compile_patterns([(k, v) for k, v in (("target_modules", tm), ("exclude_modules", ex)) if isinstance(v, str)],
                      cpath)
    wpath = folder / WEIGHTS
    if not wpath.is_file():
        raise EdgeqError(wpath, "missing")
    base = c.get("base_model_name_or_path")
    base_hint = f" (the adapter was trained on {base})" if base else ""
    modules = model_modules(graph)
    targeted = [name for name in modules if _targeted(c, name) and name != "model.embed_tokens"]
    if not targeted:
        raise EdgeqError(cpath, f"target_modules {tm!r} matches no module of the base model{base_hint}")
    found, base_layers = sparse_modules(folder, c, graph, modules, targeted, base_hint)
    return Adapter(path=folder, weight=weight, config=c, modules=found, base_layers=base_layers,
                   sha256=sha256_file(wpath),
                   config_sha256=sha256_file(cpath),
                   name=check_adapter_name(listed_as, folder) if listed_as else folder.resolve().name)


def _same_tensor(a: STensor, b: STensor, path: Path) -> STensor:
    """A tied embedding saved twice (embed_tokens and lm_head base layers): both copies must agree."""
    if a.shape != b.shape or not np.array_equal(a.load(), b.load()):
        raise EdgeqError(path, f"{a.name} and {b.name} are one tied weight but hold different values")
    return a


def _check_vocab_rows(module: str, t: STensor, graph: Graph, path: Path) -> None:
    if module.split(".")[-1] in ("embed_tokens", "lm_head") and t.shape and t.shape[0] != graph.config.vocab_size:
        raise EdgeqError(path, f"{module} has {t.shape[0]} vocabulary rows, the base model {graph.config.vocab_size}: "
                               "resized vocabularies are not supported yet")


def unmerged(ad: Adapter, graph: Graph) -> UserAdapter:
    """The adapter as a target writes it beside the base (--adapter-mode separate): each module's A and B with
    its PEFT scale folded into B, or a SHiRA adapter's sparse entries. What only a merge can express is refused in
    one line."""
    wpath = ad.path / WEIGHTS
    for target, t in ad.base_layers.items():    # PEFT saves them when an embedding or the head is targeted: the base's
        if not np.array_equal(t.load(), graph.weights[target].numpy()):
            raise EdgeqError(wpath, f"holds full weights for {target} that differ from the base model's "
                                    "(save_embedding_layers): only --adapter-mode merged can apply them")
    if is_sparse(ad.config):
        return _unmerged_sparse(ad, graph)
    for m in ad.modules:
        if m.embedding:
            raise EdgeqError(wpath, f"has a LoRA on {m.module}; embedding adapters are applied with --adapter-mode "
                                    "merged only for now")
        if m.module == "lm_head" and graph.config.tied_embeddings:
            raise EdgeqError(wpath, "has a LoRA on lm_head of a model with tied embeddings (the head is the "
                                    "embedding table): only --adapter-mode merged can apply it")
    order = list(graph.weights)
    modules = sorted(ad.modules, key=lambda m: order.index(m.target))

    def load() -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {m.target: (np.asarray(m.A.load(), np.float32),
                           np.asarray(m.B.load(), np.float32) * np.float32(m.scale)) for m in modules}

    return LoraAdapter(name=ad.name, scale=ad.weight, rank=max(m.r for m in modules),
                       targets=[m.target for m in modules],
                       modules=sorted({m.module.rsplit(".", 1)[-1] for m in modules}),
                       source_sha256=ad.sha256, config_sha256=ad.config_sha256,
                       dtype="f32" if any(t.dtype in ("F32", "F64") for m in modules for t in (m.A, m.B)) else "f16",
                       load_factors=load)


def _unmerged_sparse(ad: Adapter, graph: Graph) -> SparseAdapter:
    order = list(graph.weights)
    modules = sorted(ad.modules, key=lambda m: order.index(m.target))
    for m in modules:
        if m.module == "lm_head" and graph.config.tied_embeddings:
            raise EdgeqError(ad.path / WEIGHTS, "has a SHiRA delta on lm_head of a model with tied embeddings (the "
                                                "head is the embedding table): only --adapter-mode merged applies it")
    if len({m.target for m in modules}) != len(modules):
        raise EdgeqError(ad.path / WEIGHTS, "two SHiRA deltas change one weight")

    def load() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return {m.target: m.entries() for m in modules}

    return SparseAdapter(name=ad.name, scale=ad.weight, targets=[m.target for m in modules],
                         modules=sorted({m.module.rsplit(".", 1)[-1] for m in modules}),
                         nnz=sum(int(m.values.shape[0]) for m in modules), source_sha256=ad.sha256,
                         config_sha256=ad.config_sha256, load_entries=load)


# --- the pass -------------------------------------------------------------------------

def _merged_loader(base: Tensor, deltas: list[tuple[LoraModule, float]], replaced: STensor | None = None):
    def load() -> np.ndarray:
        w = base.numpy() if replaced is None else replaced.load()
        out = np.empty(w.shape, dtype=np.float32)
        step = max(1, (1 << 24) // max(1, w.shape[-1]))      # rows per chunk: ~64 MiB of float32 at a time
        # Row blocks of B·A (or of (B·A)ᵀ for embeddings): the full delta never exists at once.
        loaded = [(m, None, None, np.float32(wt)) if isinstance(m, SparseModule)
                  else (m, m.A.load(), m.B.load(), np.float32(wt * m.scale)) for m, wt in deltas]
        for r0 in range(0, w.shape[0], step):
            r1 = min(w.shape[0], r0 + step)
            block = w[r0:r1].copy()
            for m, a, b, s in loaded:
                if a is None:            # a SHiRA delta: its entries in these rows
                    m.add_rows(block, r0, r1, s)
                    continue
                d = (b @ a[:, r0:r1]).T if m.embedding else b[r0:r1] @ a
                block += d * s
            out[r0:r1] = block
        return out

    return load


class MergeAdapters(Pass):
    name = "merge_adapters"

    def __init__(self, adapters: list[str | tuple[str, float]]):
        self.args = list(adapters)
        self.adapters: list[Adapter] = []

    def run(self, graph: Graph, plan: Plan, ctx: Context) -> tuple[Graph, Plan]:
        if graph.arch != "llama":
            src = graph.metadata.get("source_path")
            raise EdgeqError(src, f"LoRA adapters merge into llama-family decoders; this model is {graph.arch}")
        self.adapters = [load_adapter(a, graph) for a in self.args]
        by_target: dict[str, list[tuple[LoraModule, float]]] = {}
        replaced: dict[str, STensor] = {}
        for ad in self.adapters:
            for m in ad.modules:
                by_target.setdefault(m.target, []).append((m, ad.weight))
            for target, t in ad.base_layers.items():
                replaced[target] = _same_tensor(replaced[target], t, ad.path) if target in replaced else t
        weights = dict(graph.weights)
        for target in sorted(set(by_target) | set(replaced), key=list(graph.weights).index):
            weights[target] = replace(graph.weights[target], source_bytes=None, load=_merged_loader(
                graph.weights[target], by_target.get(target, []), replaced.get(target)))
        meta = dict(graph.metadata)
        meta["adapters"] = [a.to_json() for a in self.adapters]
        merged = replace(graph, weights=weights, metadata=meta)
        notes = []
        if any(a.config.get("fan_in_fan_out") for a in self.adapters):
            notes.append("fan_in_fan_out ignored for nn.Linear modules, as PEFT does")
        ctx.record(self.name, adapters=meta["adapters"], tensors_changed=len(by_target), notes=notes)
        return merged, plan
