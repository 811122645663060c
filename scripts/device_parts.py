"""Move files larger than a device call may carry (a DALI wheel, ~260 MB) to a GPU machine in parts.

The device tool sends at most 64 MiB with each call, and a warm machine keeps ``/tmp`` for about
30 seconds between calls. So: split here, send one part per call (consecutive calls), and join
there once every part has arrived; each part and the whole are checked against SHA-256 sums.

Here (once)::

    python scripts/device_parts.py split nvidia_dali_cuda120-*.whl --out .whl_parts --size-mb 60

It writes ``.whl_parts/manifest.json`` and ``part-000``, ``part-001``... (``.whl_parts/`` is in
.gitignore) and prints the device calls to make. Each call carries the manifest and one part and
runs ``python scripts/device_parts.py stash .whl_parts``, which copies the carried parts into
``/tmp/vatt_parts`` and says which are still missing. The last call runs::

    python scripts/device_parts.py stash .whl_parts && python scripts/device_parts.py join /tmp/vatt_parts .whl

which rebuilds the file(s) into ``.whl/`` (where ``scripts/gpu_check.sh`` installs wheels from),
then the check itself, in the same call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Dict, List

MANIFEST = "manifest.json"
STASH = Path("/tmp/vatt_parts")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split(files: List[Path], out: Path, size_mb: float) -> Dict:
    """Split ``files`` into parts of at most ``size_mb`` MiB under ``out``, with a manifest."""
    if size_mb <= 0 or size_mb > 62:
        raise ValueError(f"--size-mb must be in (0, 62] (a device call carries 64 MiB in all), got {size_mb}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    limit = int(size_mb * 2**20)
    manifest: Dict = {"files": [], "parts": []}
    index = 0
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is not a file")
        entry = {"name": path.name, "size": path.stat().st_size, "sha256": _sha256(path), "parts": []}
        with open(path, "rb") as f:
            while True:
                chunk = f.read(limit)
                if not chunk and entry["parts"]:
                    break
                name = f"part-{index:03d}"
                (out / name).write_bytes(chunk)
                part = {"name": name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()}
                entry["parts"].append(name)
                manifest["parts"].append(part)
                index += 1
                if len(chunk) < limit:
                    break
        manifest["files"].append(entry)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def stash(parts_dir: Path, stash_dir: Path = STASH) -> List[str]:
    """Copy the parts present in ``parts_dir`` (checked) into ``stash_dir``; returns the missing ones."""
    manifest = json.loads((parts_dir / MANIFEST).read_text())
    stash_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(parts_dir / MANIFEST, stash_dir / MANIFEST)
    for part in manifest["parts"]:
        src = parts_dir / part["name"]
        if src.is_file():
            if _sha256(src) != part["sha256"]:
                raise ValueError(f"{src}: SHA-256 differs from the manifest; split again and resend it")
            shutil.copyfile(src, stash_dir / part["name"])
    return [p["name"] for p in manifest["parts"] if not (stash_dir / p["name"]).is_file()]


def join(stash_dir: Path, dest: Path) -> List[Path]:
    """Rebuild every file of the manifest from ``stash_dir`` into ``dest`` (checked); returns the paths."""
    manifest = json.loads((stash_dir / MANIFEST).read_text())
    missing = [p["name"] for p in manifest["parts"] if not (stash_dir / p["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"parts not yet sent: {', '.join(missing)} (send them, each call within ~30 s)")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in manifest["files"]:
        target = dest / entry["name"]
        with open(target, "wb") as f:
            for name in entry["parts"]:
                f.write((stash_dir / name).read_bytes())
        if _sha256(target) != entry["sha256"]:
            target.unlink()
            raise ValueError(f"{entry['name']}: the joined file's SHA-256 differs from the original's")
        written.append(target)
    return written


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="device_parts.py", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("split", help="split files into parts with a manifest")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path(".whl_parts"))
    p.add_argument("--size-mb", type=float, default=60.0)
    p = sub.add_parser("stash", help="(device) keep the carried parts in /tmp/vatt_parts")
    p.add_argument("parts_dir", type=Path)
    p.add_argument("--stash", type=Path, default=STASH)
    p = sub.add_parser("join", help="(device) rebuild the files once every part arrived")
    p.add_argument("stash_dir", type=Path)
    p.add_argument("dest", type=Path)
    args = parser.parse_args(argv[1:])
    try:
        if args.cmd == "split":
            manifest = split(args.files, args.out, args.size_mb)
            parts = [p["name"] for p in manifest["parts"]]
            print(f"{len(parts)} parts in {args.out}; one device call per part, each within ~30 s of the last:")
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                cmd = f"python scripts/device_parts.py stash {args.out}"
                if last:
                    cmd += f" && python scripts/device_parts.py join {STASH} .whl && <the check>"
                print(f"  carry [{args.out / MANIFEST}, {args.out / name}]  command: {cmd}")
        elif args.cmd == "stash":
            missing = stash(args.parts_dir, args.stash)
            print(f"stashed in {args.stash}; missing: {', '.join(missing) if missing else 'none'}")
        else:
            for path in join(args.stash_dir, args.dest):
                print(f"joined {path} ({path.stat().st_size} bytes, SHA-256 checked)")
    except (OSError, ValueError) as err:
        print(f"device_parts.py {args.cmd}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
