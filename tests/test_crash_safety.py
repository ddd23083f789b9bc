"""Crash safety: killed writes leave nothing or a complete output, concurrent writes to one path never mix, and
torn cache entries are detected and computed again (tests/crash_points.py runs the long campaign)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import crash_points
import numpy as np
import pytest

from edgeq.core.cache import read_entry, write_entry
from edgeq.core.errors import EdgeqError
from edgeq.core.fs import output_lock
from edgeq.runtime.manifest import read_manifest, verify_artifacts


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return crash_points.make_sources(tmp_path_factory.mktemp("crash-src"))


@pytest.mark.parametrize("name,points", [("export-gguf", 2), ("export-onnx", 2), ("export-tvm", 1),
                                         ("calibrate", 2), ("plan", 2)])
def test_kill_9_leaves_nothing_or_a_complete_output(name, points, sources, tmp_path):
    out = tmp_path / ("b" if name.startswith("export") else "out.file")
    argv = crash_points.commands(sources, out)[name]
    res = crash_points.campaign(name, argv, out, tmp_path / "cache", points, random.Random(1))
    assert res.failures == 0, res
    assert all(p["state"] in ("absent", "complete") for p in res.points)


def test_a_stale_stage_of_a_killed_export_is_removed_by_the_next(sources, tmp_path):
    out = tmp_path / "b"
    stale = tmp_path / ".b.partial-x1y2"
    stale.mkdir()
    (stale / "model.gguf").write_bytes(b"half")
    dead_tmp = tmp_path / ".b.999999999.abcd.tmp"        # a temporary file of a process that is gone
    dead_tmp.write_bytes(b"x")
    argv = crash_points.commands(sources, out)["export-gguf"]
    assert crash_points.run(argv, {**os.environ, "EDGEQ_CACHE": "off"}).returncode == 0
    verify_artifacts(out, read_manifest(out))
    assert not stale.exists() and not dead_tmp.exists() and crash_points.leftovers(out) == []


def test_two_exports_to_one_path_at_once_one_wins_the_other_errors(sources, tmp_path):
    out = tmp_path / "b"
    env = {**os.environ, "EDGEQ_CACHE": "off"}
    argv = [sys.executable, "-m", "edgeq.cli", *crash_points.commands(sources, out)["export-gguf"]]
    argv.remove("--force")
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    done = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], done
    err = next(e for p, (_, e) in zip(procs, done) if p.returncode == 2).strip().splitlines()
    assert len(err) == 1 and ("is being written by another edgeq process" in err[0] or "already exists" in err[0])
    verify_artifacts(out, read_manifest(out))
    assert crash_points.leftovers(out) == []


def test_output_lock_refuses_a_second_writer(tmp_path):
    out = tmp_path / "plan.json"
    with output_lock(out):
        with pytest.raises(EdgeqError, match=f"is being written by another edgeq process \\(pid {os.getpid()}\\)"):
            with output_lock(out):
                pass
    with output_lock(out):        # released: free again, and no lock file left behind
        pass
    assert list(tmp_path.iterdir()) == []


def test_cache_entries_carry_their_checksum(tmp_path):
    p = tmp_path / "e.json"
    assert write_entry(p, b'{"bytes": 123}')
    assert read_entry(p) == b'{"bytes": 123}'
    blob = p.read_bytes()
    for torn in (blob[:-3], blob[:10], blob.replace(b"123", b"124"), b'{"bytes": 123}'):
        p.write_bytes(torn)
        assert read_entry(p) is None and not p.exists()      # detected, removed, computed again


def test_a_torn_calibration_is_recomputed_never_used(sources, tmp_path, monkeypatch):
    from edgeq.api import calibrate

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    im, _ = calibrate(tmp_path / "a.gguf", model=str(sources["llama"]), calib_windows=1)
    (entry,) = (tmp_path / "cache" / "calibration").glob("*.npz")
    good = entry.read_bytes()
    for torn in (good[: len(good) // 2], good[:-100] + bytes(100)):
        entry.write_bytes(torn)
        again, _ = calibrate(tmp_path / "b.gguf", model=str(sources["llama"]), calib_windows=1)
        assert entry.read_bytes() == good         # recomputed (the same numbers) and stored whole again
        for k, e in im.entries.items():
            assert np.array_equal(again.entries[k].sums, e.sums)


def test_a_torn_sensitivity_table_is_recomputed(sources, tmp_path, monkeypatch):
    from edgeq.api import plan

    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))
    opts = dict(model=str(sources["llama"]), bpw=6.0, cost="output", calib_windows=1)

    def decisions() -> dict:
        d = plan(**opts).to_json()
        d["search"].pop("seconds")
        return d

    first = decisions()
    (entry,) = (tmp_path / "cache" / "sensitivity").glob("*.json")
    good = entry.read_bytes()
    entry.write_bytes(good.replace(b"e-", b"e+", 1))         # a valid JSON number, a wrong cost
    assert decisions() == first
    assert entry.read_bytes() == good


def test_a_torn_tuning_database_is_repaired(tmp_path):
    from edgeq.targets.tvm.tune import repair_database

    (tmp_path / "workloads.json").write_bytes(b'["a", {}]\n["b", {}]\n["c", {"x": ')
    (tmp_path / "records.json").write_bytes(b'[0, [1]]\n[1, [2]]\n[2, [3]]\n[1, [')
    assert repair_database(tmp_path) == 3
    assert (tmp_path / "workloads.json").read_bytes() == b'["a", {}]\n["b", {}]\n'
    assert (tmp_path / "records.json").read_bytes() == b'[0, [1]]\n[1, [2]]\n'
    assert repair_database(tmp_path) == 0
