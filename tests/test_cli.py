"""The command line as a user runs it: export for android, run, chat, eval --json, inspect; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EDGEQ = [sys.executable, "-m", "edgeq.cli"]


def edgeq(*args, cwd=None, timeout=900):
    return subprocess.run([*EDGEQ, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_export_android(android):
    out, r = android
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["name"] == "android" and m["target"]["isa"] == "arm64"
    assert m["plan"]["preset"] == "q4_k_m"
    assert "wrote" in r.stdout and "bpw" in r.stdout
    assert "quantize+write" in r.stderr  # progress on stderr


def test_run_continues_a_prompt(android):
    out, _ = android
    r = edgeq("run", out, "The capital of France is", "--max-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is")
    assert len(r.stdout.strip()) > len("The capital of France is") + 3


def test_run_chat_answers_and_stops(android):
    out, _ = android
    r = edgeq("run", out, "--chat", "What is the capital of France? Answer in one word.", "--max-tokens", "48")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "<|im_end|>" not in r.stdout and "<|im_start|>" not in r.stdout
    assert "Paris" in r.stdout


def test_eval_json_is_one_flat_object(android, tmp_path):
    out, _ = android
    from edgeq.evaluate.texts import evaluation_text

    text = tmp_path / "held_out.txt"
    text.write_text(evaluation_text()[:20000])
    r = edgeq("eval", out, "--text", text, "--ctx", "128", "--chunks", "2", "--json", "--no-record")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert {"ppl", "kld_mean", "top1", "n_tokens_scored", "ctx", "backend"} <= set(d)
    assert all(not isinstance(v, (dict, list)) for v in d.values())
    assert d["backend"] == "gguf" and d["ctx"] == 128 and d["n_tokens_scored"] == 2 * 63
    assert 0 < d["top1"] <= 1 and d["kld_mean"] > 0 and d["ppl"] > 1


def test_inspect_bundle_and_gguf(android, smollm_path):
    out, _ = android
    r = edgeq("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["checksums"] == "ok" and d["preset"] == "q4_k_m" and d["backends"] == ["gguf"]
    r = edgeq("inspect", smollm_path, "--json")
    d = json.loads(r.stdout)
    assert d["tensor_types"] == {"f32": 61, "q4_1": 210, "q8_0": 1} and d["architecture"] == "llama"


def test_plan_written_and_consumed(tmp_path):
    plan = tmp_path / "plan.json"
    r = edgeq("plan", "--quant", "q4_k_m", "-o", plan)
    assert r.returncode == 0, r.stderr
    d = json.loads(plan.read_text())
    assert d["preset"] == "q4_k_m"
    down = d["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert down["format"] == "q6_k"
    q = d["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert q == {"format": "q5_0", "reason": q["reason"], "requested": "q4_k"}
    # a person edits it: glob rules over GGUF names, then one explicit tensor
    edited = {"version": 1, "preset": "q4_0", "rules": [{"match": "*.ffn_down", "format": "q8_0"}],
              "tensors": {"blk.3.attn_v.weight": {"format": "q4_k"}}}
    plan.write_text(json.dumps(edited))
    out = tmp_path / "b"
    r = edgeq("export", "--plan", plan, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    t = m["plan"]["tensors"]
    assert t["model.layers.5.mlp.down_proj.weight"]["format"] == "q8_0"
    assert t["model.layers.5.mlp.up_proj.weight"]["format"] == "q4_0"
    v = t["model.layers.3.self_attn.v_proj.weight"]
    assert v["format"] == "q5_0" and v["requested"] == "q4_k" and "256" in v["reason"]


# --- bad input: one line naming the file, non-zero exit, nothing left behind ---------------------

def assert_clean_failure(r, name: str, out: Path):
    assert r.returncode != 0
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1, r.stderr
    assert err[0].startswith("edgeq: error:") and name in err[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _truncated(src, dst, n):
    dst.write_bytes(src.read_bytes()[:n])


def _past_end(src, dst):
    from edgeq.importers.gguf_metadata import open_gguf

    last = max(open_gguf(src).tensors, key=lambda t: t.data_offset)
    dst.write_bytes(src.read_bytes()[: int(last.data_offset) + 100])


BAD_MODELS = {
    "missing.gguf": lambda src, dst: None,
    "truncated.gguf": lambda src, dst: _truncated(src, dst, 200_000),
    "header.gguf": lambda src, dst: _truncated(src, dst, 1000),
    "past_end.gguf": _past_end,
    "weights.bin": lambda src, dst: dst.write_bytes(b"\x80\x04pickle-ish" * 100),
}


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_bad_model_file(name, tmp_path, smollm_path):
    bad = tmp_path / name
    BAD_MODELS[name](smollm_path, bad)
    out = tmp_path / "b"
    r = edgeq("export", "--model", bad, "-o", out)
    assert_clean_failure(r, name, out)
    if name == "past_end.gguf":
        assert "past the end" in r.stderr


def test_output_under_a_regular_file(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "bundle"
    r = edgeq("export", "-o", out)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "afile" in r.stderr
    assert blocker.read_text() == "x"


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\x80\x04pickle-ish" * 100)
    out = tmp_path / "b"
    r = edgeq("export", "--model", bad, "-o", out)
    assert_clean_failure(r, "weights.bin", out)


def test_bad_plan(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 1, "rules": [{"match": "*.ffn_down", "format": "q7_z"}]}')
    out = tmp_path / "b"
    r = edgeq("export", "--plan", plan, "-o", out)
    assert_clean_failure(r, "plan.json", out)
    assert "q7_z" in r.stderr


def test_unknown_target(tmp_path):
    r = edgeq("export", "--target", "toaster", "-o", tmp_path / "b")
    assert r.returncode == 2 and "toaster" in r.stderr


# --- a CLI that explains itself ------------------------------------------------------------------------------

def _commands(parser):
    """(name, parser) of every command and subcommand."""
    import argparse

    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                out.append((f"{parser.prog.split(' ', 1)[-1]} {name}".replace("edgeq ", ""), sp))
                out += _commands(sp)
    return out


def test_every_option_says_its_default_and_every_command_ends_with_examples():
    from edgeq.cli import build_parser

    commands = _commands(build_parser())
    assert {"export", "plan", "calibrate", "run", "chat", "serve", "eval", "inspect", "device setup"} <= \
        {name for name, _ in commands}
    for name, sp in commands:
        text = sp.format_help()
        formatter = sp._get_formatter()
        for action in sp._actions:
            if not action.option_strings or "--help" in action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert action.required or "default" in shown, f"{name} {action.option_strings[0]}: {shown}"
        tail = text.rstrip().split("examples:\n")
        assert len(tail) == 2, f"{name} --help has no examples"
        examples = [line.strip() for line in tail[1].splitlines()]
        assert 2 <= len(examples) <= 3 and all(e.startswith(("edgeq ", "curl ")) for e in examples), name
    r = edgeq("serve", "--help")
    flat = " ".join(r.stdout.split())
    assert r.returncode == 0 and "(default: 127.0.0.1)" in flat and "(default: 8080)" in flat
    assert r.stdout.rstrip().splitlines()[-3].strip() == "edgeq serve out/"


def test_version():
    from edgeq import __version__

    r = edgeq("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"edgeq {__version__}"


def test_user_errors_are_one_line_and_exit_2(android, tmp_path):
    out, _ = android
    cases = {
        "unknown option": (["run", out, "hi", "--bogus"], "--bogus"),
        "missing bundle": (["run", tmp_path / "nowhere", "hi"], "nowhere"),
        "prompt longer than the context": (["run", out, "word " * 300, "--n-ctx", "128"], "context holds 128"),
        "bad sampling value": (["run", out, "hi", "--top-p", "0"], "top_p"),
        "chat with a missing bundle": (["chat", tmp_path / "nowhere"], "nowhere"),
        "serve a folder that is no bundle": (["serve", tmp_path], "no manifest.json"),
        "no command": ([], "required"),
    }
    for name, (args, needle) in cases.items():
        r = edgeq(*args)
        err = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(err) == 1, (name, r.stderr)
        assert err[0].startswith("edgeq") and "error:" in err[0] and needle in err[0], (name, err)
        assert "Traceback" not in r.stderr
    import os

    r = subprocess.run([*EDGEQ, "run", str(tmp_path / "nowhere"), "hi"], capture_output=True, text=True,
                       env={**os.environ, "EDGEQ_DEBUG": "1"}, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr and "BundleError" in r.stderr


def test_run_streams_sampling_options_and_truncation(android):
    out, _ = android
    r = edgeq("run", out, "--system", "You are a geography teacher.", "What is the capital of France?",
              "--max-tokens", "24")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
    a = edgeq("run", out, "Once upon a time", "--max-tokens", "16", "--temperature", "0.9", "--seed", "3")
    b = edgeq("run", out, "Once upon a time", "--max-tokens", "16", "--temperature", "0.9", "--seed", "3")
    c = edgeq("run", out, "Once upon a time", "--max-tokens", "16", "--temperature", "0.9", "--seed", "4")
    assert a.stdout == b.stdout != c.stdout and a.stdout.startswith("Once upon a time")
    r = edgeq("run", out, "word " * 300, "--n-ctx", "128", "--truncate", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    r = edgeq("run", out, "The capital of France is", "--stop", "Paris", "--max-tokens", "12")
    assert r.returncode == 0 and r.stdout.strip() == "The capital of France is"


def test_chat_keeps_history_resets_and_exits(android):
    """The terminal chat on piped input: each reply sees the turns before it; /reset forgets them."""
    import io

    from edgeq import runtime
    from edgeq.runtime.terminal_chat import chat_loop

    out, _ = android
    turns = iter(["My name is Ada.", "What is my name?", "/reset", "What is my name?", "/exit", "never read"])
    screen = io.StringIO()
    with runtime.load(out) as s:
        n = chat_loop(s, system="You are brief.", max_tokens=24, read=lambda prompt: next(turns), out=screen,
                      prompt="")
        sys_msg = {"role": "system", "content": "You are brief."}
        first = s.chat([sys_msg, {"role": "user", "content": "My name is Ada."}], 24)
        second = s.chat([sys_msg, {"role": "user", "content": "My name is Ada."},
                         {"role": "assistant", "content": first}, {"role": "user", "content": "What is my name?"}], 24)
        fresh = s.chat([sys_msg, {"role": "user", "content": "What is my name?"}], 24)
    assert n == 3 and second != fresh
    assert screen.getvalue() == f"{first}\n{second}\n(conversation reset)\n{fresh}\n"
    r = subprocess.run([*EDGEQ, "chat", str(out), "--max-tokens", "24"], input="What is the capital of France?\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr
