"""scripts/device_parts.py: files split here, sent a part per device call, joined and checked there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "device_parts.py"


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("sizes", [[0], [2**20], [3 * 2**20 + 17, 5]], ids=["empty", "exact-multiple", "two-files"])
def test_split_stash_join_roundtrip(tmp_path, sizes):
    files = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"pkg{i}-1.0-py3-none-any.whl"
        path.write_bytes(os.urandom(size))
        files.append(path)
    parts = tmp_path / "parts"
    run = _run("split", *files, "--out", parts, "--size-mb", "1")
    assert run.returncode == 0, run.stderr
    manifest = json.loads((parts / "manifest.json").read_text())
    assert all(p["size"] <= 2**20 for p in manifest["parts"])
    assert f"{len(manifest['parts'])} parts" in run.stdout

    # The device side: parts arrive one call at a time; join refuses until all are there.
    stash = tmp_path / "stash"
    for i, part in enumerate(manifest["parts"]):
        call = tmp_path / f"call{i}"
        call.mkdir()
        (call / "manifest.json").write_bytes((parts / "manifest.json").read_bytes())
        (call / part["name"]).write_bytes((parts / part["name"]).read_bytes())
        run = _run("stash", call, "--stash", stash)
        assert run.returncode == 0, run.stderr
        remaining = [p["name"] for p in manifest["parts"][i + 1:]]
        assert run.stdout.strip().endswith(", ".join(remaining) if remaining else "none"), run.stdout
        if remaining:
            run = _run("join", stash, tmp_path / "out")
            assert run.returncode == 1 and "parts not yet sent" in run.stderr
    run = _run("join", stash, tmp_path / "out")
    assert run.returncode == 0, run.stderr
    for path in files:
        assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes()


def test_corrupt_part_is_refused(tmp_path):
    src = tmp_path / "a.whl"
    src.write_bytes(os.urandom(3000))
    parts = tmp_path / "parts"
    assert _run("split", src, "--out", parts, "--size-mb", "0.001").returncode == 0
    first = parts / "part-000"
    first.write_bytes(b"x" + first.read_bytes()[1:])
    run = _run("stash", parts, "--stash", tmp_path / "stash")
    assert run.returncode == 1 and "SHA-256 differs" in run.stderr
    assert _run("split", src, "--out", parts, "--size-mb", "63").returncode == 1
