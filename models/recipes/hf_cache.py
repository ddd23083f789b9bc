"""A Hugging Face cache laid out as huggingface_hub lays it out, filled from local folders (no hub needed).

`models--org--name/blobs/<sha256>` holds each file once, `snapshots/<commit>/<path>` links to it, and
`refs/<revision>` names the commit: what `snapshot_download` leaves behind, so tests can resolve
`--model org/name[@revision]` offline exactly as a user's cache would.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hf_cache(cache: str | os.PathLike, repo_id: str, folder: str | os.PathLike, revision: str = "main",
                    commit: str | None = None) -> Path:
    """Put every file of `folder` into `cache` as revision `revision` of model `repo_id`; returns the snapshot."""
    cache, folder = Path(cache), Path(folder)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    if commit is None:         # a stable stand-in for the git commit: a hash of the tree
        tree = "".join(f"{p.relative_to(folder).as_posix()}\0{digests[p]}\n" for p in files)
        commit = hashlib.sha1(tree.encode()).hexdigest()
    snap = repo / "snapshots" / commit
    for p in files:
        blob = repo / "blobs" / digests[p]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(p.read_bytes())
        link = snap / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snap
