"""Byte-identity matrix of exports: every backend x model kind x way of deciding, hashed.

A refactor of the compile pipeline must not change what an export writes. This script runs the README's
commands (`edgeq export`, `edgeq plan`, `edgeq calibrate`, through the CLI, so it does not depend on the
Python layout) over small synthetic models and, where no small model stands in, the embedded SmolLM2, and
hashes what they write: model files, reference outputs, tokenizer files and the manifest (with the fields
that legitimately vary removed, `VOLATILE`). Errors are results too (their one-line message is hashed).

    python tests/export_matrix.py record -o tests/data/export_matrix.json     # before a change
    python tests/export_matrix.py check tests/data/export_matrix.json         # after: exit 1 on a difference
    python tests/export_matrix.py accept tests/data/export_matrix.json CASE... --reason "why"

`accept` records the last check's outputs of CASEs as changed on purpose, with the reason: later checks
compare those cases with their accepted outputs, and say so.

Hashes depend on the machine's float kernels (BLAS, llama.cpp's build): compare on the machine that
recorded them (the file records its CPU flags). `--work DIR` is where the bundles go (keep one per checkout
when several run at once); `--only REGEX` runs a subset. The inputs are made once, seeded, in INPUTS: their
absolute paths reach some manifests (an imatrix file's path), so every run reads them from there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# manifest keys whose values depend on the run, not the inputs: the package version, and solver wall time
VOLATILE = {"edgeq_version", "seconds"}
INPUTS = Path("/tmp/edgeq-export-matrix/inputs")
# bundle files that hold measurements (timings, this host) rather than what was compiled
MEASURED = {"measurements.json", "report.md"}


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "fma", "f16c")))
    except OSError:
        pass
    return []


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_output(path: Path) -> dict[str, str]:
    """{relative file: sha256} of a bundle folder or a single file; manifests and plans normalised."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = {}
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        if rel in MEASURED or f.suffix == ".png":
            continue
        data = f.read_bytes()
        if f.suffix == ".json" and (rel == "manifest.json" or not path.is_dir()):
            # key order is part of the bytes: keep it, drop only the volatile fields
            data = json.dumps(_strip(json.loads(data)), indent=1).encode()
        out[rel] = _sha(data)
    return out


# --- inputs -------------------------------------------------------------------

def make_inputs(folder: Path) -> dict[str, str]:
    """The models and files the cases read, made once per folder (deterministic: seeded)."""
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "inputs.json"
    if done.is_file():
        inputs = json.loads(done.read_text())
        if "spm_decoder" not in inputs:          # a folder made before these inputs existed
            inputs.update(_user_data_inputs(folder))
            done.write_text(json.dumps(inputs, indent=1) + "\n")
        return inputs
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.synthetic import byte_level_spec, random_llama, tiny_config, write_bert_folder

    inputs: dict[str, str] = {}
    cfg = tiny_config(vocab_size=400, tied_embeddings=True, context_length=512)
    dec = graph_to_hf_folder(random_llama(cfg, seed=1, scale=0.08), folder / "decoder", byte_level_spec(400))
    inputs["decoder"] = str(dec)
    inputs["encoder"] = str(write_bert_folder(folder / "encoder"))
    inputs["adapter"] = str(_write_adapter(folder / "adapter", cfg))
    inputs.update(_write_cnn(folder))
    inputs.update(_user_data_inputs(folder))
    plans = {
        "gguf_rules": {"version": 1, "preset": "q4_0", "rules": [{"match": "*.mlp.down_proj", "format": "q8_0"}],
                       "tensors": {"blk.1.attn_v.weight": {"format": "q6_k"}}},
        "gguf_ranks": {"version": 1, "preset": "q4_0",
                       "tensors": {"model.layers.0.mlp.down_proj.weight": {"format": "q4_0", "rank": 8}}},
        "onnx_rules": {"version": 1, "preset": "int4", "rules": [{"match": "*.mlp.down_proj", "format": "int8_b32"}]},
        "tvm_rules": {"version": 1, "preset": "int4", "rules": [{"match": "*.self_attn.v_proj", "format": "int8_wo"}]},
        "encoder_rules": {"version": 1, "preset": "int8", "rules": [{"match": "*.output.dense", "format": "f32"}]},
    }
    for name, plan in plans.items():
        (folder / f"{name}.json").write_text(json.dumps(plan, indent=1) + "\n")
        inputs[name] = str(folder / f"{name}.json")
    done.write_text(json.dumps(inputs, indent=1) + "\n")
    return inputs


def _user_data_inputs(folder: Path) -> dict[str, str]:
    """A decoder with a trained SentencePiece tokenizer.model, and calibration text and chats of the user's own."""
    from edgeq.evaluate.texts import evaluation_text
    from edgeq.models.recipes.hf_folder import graph_to_hf_folder
    from edgeq.models.recipes.sentencepiece_vocab import llama_tokenizer_config, train_sentencepiece
    from edgeq.models.recipes.synthetic import random_llama, tiny_config

    cfg = tiny_config(vocab_size=600, tied_embeddings=True, context_length=512)
    spm = graph_to_hf_folder(random_llama(cfg, seed=2, scale=0.08), folder / "spm-decoder")
    train_sentencepiece(spm / "tokenizer.model", 600, control_symbols=("<|im_start|>", "<|im_end|>"))
    llama_tokenizer_config(spm, chat_template="{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                                              "m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    text = evaluation_text()                 # text the default calibration never sees stands in for a user's
    (folder / "calib.txt").write_text(text[:60_000], encoding="utf-8")
    chats = [{"messages": [{"role": "user", "content": p[:200]}, {"role": "assistant", "content": p[200:1200]}]}
             for p in text[60_000:160_000].split("\n\n") if len(p) > 300]
    (folder / "calib.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return {"spm_decoder": str(spm), "calib_text": str(folder / "calib.txt"), "calib_jsonl": str(folder / "calib.jsonl")}


def _write_adapter(folder: Path, cfg) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj, down_proj; r 4, alpha 8) with seeded random A and B."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    r = 4
    dims = {"self_attn.q_proj": (cfg.n_heads * cfg.head_dim, cfg.hidden_size),
            "self_attn.v_proj": (cfg.n_kv_heads * cfg.head_dim, cfg.hidden_size),
            "mlp.down_proj": (cfg.hidden_size, cfg.intermediate_size)}
    tensors = {}
    for layer in range(cfg.n_layers):
        for mod, (out_dim, in_dim) in dims.items():
            base = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{base}.lora_A.weight"] = (0.05 * rng.standard_normal((r, in_dim))).astype(np.float32)
            tensors[f"{base}.lora_B.weight"] = (0.05 * rng.standard_normal((out_dim, r))).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}, indent=1) + "\n")
    return folder


def _write_cnn(folder: Path) -> dict[str, str]:
    import torch

    from edgeq.models.recipes.digits import train_digits_cnn

    model, data = train_digits_cnn(epochs=2)
    ep = torch.export.export(model, (torch.from_numpy(data.x_test[:1]),))
    torch.export.save(ep, str(folder / "digits.pt2"))
    np.savez(folder / "calib.npz", images=data.x_train[:64])
    return {"cnn": str(folder / "digits.pt2"), "calib": str(folder / "calib.npz")}


# --- cases ----------------------------------------------------------------------

LATENCY_PROFILE = str(Path(__file__).resolve().parent / "data" / "latency_profile_gguf_quick.json")
ENCODER_LATENCY_PROFILE = str(Path(__file__).resolve().parent / "data" / "latency_profile_onnx_encoder_quick.json")


def cases(i: dict[str, str]) -> dict[str, list[str]]:
    """name -> edgeq argv (the output path is appended: `-o OUT`)."""
    dec, enc, cnn = ["--model", i["decoder"]], ["--model", i["encoder"]], ["--model", i["cnn"]]
    lat = ["--latency-profile", LATENCY_PROFILE]
    c = {
        # GGUF decoders
        "gguf/q4_k_m": ["export", *dec, "--backend", "gguf", "--quant", "q4_k_m"],
        "gguf/q4_0-nocal": ["export", *dec, "--backend", "gguf", "--quant", "q4_0", "--no-calibration"],
        "gguf/f16": ["export", *dec, "--backend", "gguf", "--quant", "f16"],
        "gguf/q3_k_m-android": ["export", *dec, "--target", "android", "--quant", "q3_k_m"],
        "gguf/q3_k_m-android-nonative": ["export", *dec, "--target", "android", "--quant", "q3_k_m", "--no-native"],
        "gguf/q8_0-arm64": ["export", *dec, "--target", "linux-arm64", "--quant", "q8_0"],
        "gguf/native-cpu-refused": ["export", *dec, "--target", "cpu", "--native"],
        "gguf/budget-output": ["export", *dec, "--backend", "gguf", "--bpw", "5.5", "--cost", "output"],
        "gguf/budget-fisher": ["export", *dec, "--backend", "gguf", "--budget-mb", "0.95"],
        "gguf/budget-ranks": ["export", *dec, "--backend", "gguf", "--bpw", "5", "--ranks", "0,8", "--cost", "output",
                              "--ties", "qkv,gate_up"],
        "gguf/dynaquant": ["export", *dec, "--backend", "gguf", "--bpw", "5", "--method", "dynaquant"],
        "gguf/plan-rules": ["export", *dec, "--backend", "gguf", "--plan", i["gguf_rules"]],
        "gguf/plan-ranks": ["export", *dec, "--backend", "gguf", "--plan", i["gguf_ranks"]],
        "gguf/adapter": ["export", *dec, "--backend", "gguf", "--quant", "q8_0", "--adapter", i["adapter"] + ":0.5"],
        "gguf/adapter-separate": ["export", *dec, "--backend", "gguf", "--quant", "q8_0", "--adapter",
                                  i["adapter"] + ":0.5=lora", "--adapter-mode", "separate"],
        "onnx-dec/adapter-separate": ["export", *dec, "--backend", "onnx", "--quant", "int4", "--adapter",
                                      i["adapter"] + "=lora", "--adapter-mode", "separate"],
        "tvm-dec/adapter-separate": ["export", *dec, "--backend", "tvm", "--quant", "f16", "--adapter",
                                     i["adapter"] + "=lora", "--adapter-mode", "separate"],
        "gguf/imatrix-file": ["export", *dec, "--backend", "gguf", "--quant", "q4_k_s", "--imatrix", i["imatrix"]],
        "gguf/q8_0-ctx": ["export", *dec, "--quant", "q8_0", "--n-ctx", "256", "--kv-dtype", "q8_0"],
        "gguf/budget-too-small": ["export", *dec, "--backend", "gguf", "--bpw", "1"],
        "gguf/latency-predicted": ["export", *dec, "--backend", "gguf", "--quant", "q4_0", *lat],
        "gguf/latency-budget": ["export", *dec, "--backend", "gguf", "--latency-ms", "0.6", "--cost", "output", *lat],
        "gguf/latency-too-fast": ["export", *dec, "--backend", "gguf", "--latency-ms", "0.001", *lat],
        "onnx-enc/latency-predicted": ["export", *enc, "--backend", "onnx", "--quant", "int8-dyn",
                                       "--latency-profile", ENCODER_LATENCY_PROFILE],
        "all/gguf+onnx": ["export", *dec, "--backend", "all", "--quant", "gguf=q4_0,onnx=int4"],
        # models and data as users have them: a SentencePiece vocabulary, their own calibration text and chats
        "gguf/spm-q4_k_m": ["export", "--model", i["spm_decoder"], "--backend", "gguf", "--quant", "q4_k_m"],
        "all/spm-gguf+onnx": ["export", "--model", i["spm_decoder"], "--backend", "all", "--quant",
                              "gguf=q4_0,onnx=int4"],
        "gguf/calib-text": ["export", *dec, "--backend", "gguf", "--quant", "q4_k_m", "--calib-text", i["calib_text"]],
        "gguf/calib-jsonl-budget": ["export", *dec, "--backend", "gguf", "--bpw", "5", "--cost", "output",
                                    "--calib-jsonl", i["calib_jsonl"]],
        "onnx-enc/int8-calib-text": ["export", *enc, "--backend", "onnx", "--quant", "int8", "--calib-text",
                                     i["calib_text"]],
        # ONNX decoders
        "onnx-dec/int4": ["export", *dec, "--backend", "onnx", "--quant", "int4"],
        "onnx-dec/int8": ["export", *dec, "--backend", "onnx", "--quant", "int8"],
        "onnx-dec/f16": ["export", *dec, "--backend", "onnx", "--quant", "f16"],
        "onnx-dec/budget": ["export", *dec, "--backend", "onnx", "--bpw", "6", "--cost", "output"],
        "onnx-dec/budget-ranks": ["export", *dec, "--backend", "onnx", "--bpw", "6", "--ranks", "0,8"],
        "onnx-dec/dynaquant": ["export", *dec, "--backend", "onnx", "--bpw", "6", "--method", "dynaquant"],
        "onnx-dec/plan-rules": ["export", *dec, "--backend", "onnx", "--plan", i["onnx_rules"]],
        # TVM decoders
        "tvm-dec/int4": ["export", *dec, "--backend", "tvm", "--quant", "int4"],
        "tvm-dec/int8": ["export", *dec, "--backend", "tvm", "--quant", "int8"],
        "tvm-dec/int4-android": ["export", *dec, "--target", "android", "--backend", "tvm"],
        "tvm-dec/budget": ["export", *dec, "--backend", "tvm", "--bpw", "11", "--cost", "output"],
        "tvm-dec/budget-ranks": ["export", *dec, "--backend", "tvm", "--bpw", "12", "--ranks", "0,8",
                                 "--cost", "output"],
        "tvm-dec/dynaquant": ["export", *dec, "--backend", "tvm", "--bpw", "11", "--method", "dynaquant"],
        "tvm-dec/int4-arm64": ["export", *dec, "--target", "linux-arm64", "--backend", "tvm"],
        "tvm-dec/plan-rules": ["export", *dec, "--backend", "tvm", "--plan", i["tvm_rules"]],
        # encoders
        "onnx-enc/int8": ["export", *enc],
        "onnx-enc/f32": ["export", *enc, "--backend", "onnx", "--quant", "f32"],
        "onnx-enc/int8-dyn": ["export", *enc, "--backend", "onnx", "--quant", "int8-dyn"],
        "onnx-enc/int4": ["export", *enc, "--backend", "onnx", "--quant", "int4"],
        "onnx-enc/plan-rules": ["export", *enc, "--backend", "onnx", "--plan", i["encoder_rules"]],
        "onnx-enc/budget": ["export", *enc, "--backend", "onnx", "--bpw", "6"],
        "tvm-enc/int8": ["export", *enc, "--backend", "tvm", "--quant", "int8"],
        "tvm-enc/int4": ["export", *enc, "--backend", "tvm", "--quant", "int4"],
        # CNNs
        "onnx-cnn/int8": ["export", *cnn, "--calib-images", i["calib"]],
        "onnx-cnn/int8-nocalib": ["export", *cnn],
        "onnx-cnn/int8-dyn": ["export", *cnn, "--quant", "int8-dyn"],
        "onnx-cnn/f16": ["export", *cnn, "--quant", "f16"],
        "tvm-cnn/f32": ["export", *cnn, "--backend", "tvm", "--quant", "f32"],
        "tvm-cnn/int8": ["export", *cnn, "--backend", "tvm", "--quant", "int8", "--calib-images", i["calib"]],
        # plans and imatrix files
        "plan/gguf-q4_k_m": ["plan", *dec, "--quant", "q4_k_m"],
        "plan/gguf-budget": ["plan", *dec, "--bpw", "5", "--cost", "output"],
        "plan/gguf-latency-and-bytes": ["plan", *dec, "--bpw", "6", "--latency-ms", "4", "--prompt-tokens", "64",
                                        "--cost", "output", *lat],
        "plan/onnx-int8": ["plan", *dec, "--backend", "onnx", "--quant", "int8"],
        "plan/onnx-budget": ["plan", *dec, "--backend", "onnx", "--bpw", "6", "--cost", "output"],
        "plan/tvm-int4": ["plan", *dec, "--backend", "tvm", "--quant", "int4"],
        "plan/cnn-int8": ["plan", *cnn, "--calib-images", i["calib"]],
        "plan/encoder-int8": ["plan", *enc],
        "calibrate/imatrix": ["calibrate", *dec],
        # UniQL: sorted MLPs and a pruning table
        "uniql/gguf-q4_0": ["export", *dec, "--backend", "gguf", "--quant", "q4_0", "--pruning-rates",
                            "0,0.15,0.35"],
        "uniql/gguf-wanda-uniform": ["export", *dec, "--backend", "gguf", "--quant", "q8_0", "--pruning-rates",
                                     "0.25", "--prune-order", "wanda", "--prune-alloc", "uniform"],
        "uniql/onnx-int4": ["export", *dec, "--backend", "onnx", "--quant", "int4", "--pruning-rates", "0.15,0.35"],
        "uniql/tvm-int4": ["export", *dec, "--backend", "tvm", "--quant", "int4", "--pruning-rates", "0.15,0.35"],
        "uniql/onnx-int4-attention": ["export", *dec, "--backend", "onnx", "--quant", "int4", "--pruning-rates",
                                      "0.15,0.35", "--prune-attention"],
        "uniql/gguf-q4_0-compensate": ["export", *dec, "--backend", "gguf", "--quant", "q4_0", "--pruning-rates",
                                       "0,0.15,0.35", "--prune-compensate"],
        "uniql/plan": ["plan", *dec, "--quant", "q4_0", "--pruning-rates", "0.15,0.35"],
        "uniql/backend-all": ["export", *dec, "--backend", "all", "--pruning-rates", "0.15"],
        # the embedded default model: README command 1
        "smollm2/android": ["export", "--target", "android"],
    }
    return c


def run_case(argv: list[str], out: Path, env: dict[str, str]) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    if argv[0] == "plan":
        target = out.with_suffix(".json")
    elif argv[0] == "calibrate":
        target = out.with_suffix(".gguf")
    else:
        target = out
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "edgeq.cli", *argv, "-o", str(target), "--quiet"],
                       capture_output=True, text=True, env=env)
    seconds = round(time.perf_counter() - t0, 1)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        err = err.replace(str(out.parent.parent), "<work>")
        return {"error": err, "rc": p.returncode, "seconds": seconds}
    return {"files": digest_output(target), "seconds": seconds}


def run_matrix(work: Path, only: str | None) -> dict:
    inputs = make_inputs(INPUTS)
    env = {**os.environ, "EDGEQ_CACHE": str(work / "cache")}
    imatrix = INPUTS / "imatrix.gguf"
    if not imatrix.is_file():        # an input too (made once by whichever run came first)
        subprocess.run([sys.executable, "-m", "edgeq.cli", "calibrate", "--model", inputs["decoder"], "-o",
                        str(imatrix), "--quiet"], check=True, env=env)
    inputs["imatrix"] = str(imatrix)
    results = {}
    todo = {k: v for k, v in cases(inputs).items() if only is None or re.search(only, k)}
    for n, (name, argv) in enumerate(todo.items(), 1):
        res = run_case(argv, work / "out" / name, env)
        results[name] = res
        status = res.get("error", f"{len(res.get('files', {}))} files")
        print(f"[{n}/{len(todo)}] {name}: {status} ({res['seconds']} s)", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("-o", "--out", required=True)
    chk = sub.add_parser("check")
    chk.add_argument("against")
    acc = sub.add_parser("accept")
    acc.add_argument("against")
    acc.add_argument("cases", nargs="+")
    acc.add_argument("--reason", required=True)
    for sp in (rec, chk, acc):
        sp.add_argument("--work", default="/tmp/edgeq-export-matrix")
        sp.add_argument("--only", help="regex over case names")
    a = ap.parse_args(argv)
    work = Path(a.work)
    if a.cmd == "accept":
        recorded = json.loads(Path(a.against).read_text())
        last = json.loads((work / "after" / "results.json").read_text())
        for name in a.cases:
            recorded.setdefault("changed", {})[name] = {"reason": a.reason, **last[name]}
        Path(a.against).write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return 0
    if a.cmd == "check":
        before = json.loads(Path(a.against).read_text())
        work = work / "after"
    else:
        work = work / "before"
    results = run_matrix(work, a.only)
    (work / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    head = {"machine": platform.machine(), "cpu_flags": _cpu_flags(), "python": platform.python_version()}
    if a.cmd == "record":
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"host": head, "cases": results}, indent=1, sort_keys=True) + "\n")
        return 0
    if before["host"]["cpu_flags"] != head["cpu_flags"]:
        print("warning: recorded on a CPU with other flags; float kernels may differ", file=sys.stderr)
    bad = 0
    for name, res in results.items():
        old = before["cases"].get(name)
        changed = before.get("changed", {}).get(name)
        if changed is not None:
            old = changed
        if old is None:
            print(f"NEW   {name}")
            continue
        if {k: v for k, v in old.items() if k not in ("seconds", "reason")} == \
                {k: v for k, v in res.items() if k != "seconds"}:
            why = f"; changed on purpose: {changed['reason']}" if changed else ""
            print(f"same  {name} ({old['seconds']} s -> {res['seconds']} s{why})")
            continue
        bad += 1
        print(f"DIFF  {name}")
        if "error" in old or "error" in res:
            print(f"      before: {old.get('error', 'ok')}\n      after:  {res.get('error', 'ok')}")
            continue
        for f in sorted(set(old["files"]) | set(res["files"])):
            if old["files"].get(f) != res["files"].get(f):
                print(f"      {f}: {old['files'].get(f, '-')[:12]} -> {res['files'].get(f, '-')[:12]}")
    accepted = sum(1 for n in results if n in before.get("changed", {}))
    print(f"{len(results) - bad} of {len(results)} cases byte-identical to what was recorded"
          + (f" ({accepted} of them changed on purpose, as accepted)" if accepted else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
