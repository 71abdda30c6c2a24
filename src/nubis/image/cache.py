"""The content-addressed cache that guest images are built into.

Each artifact lives in ``<cache>/<kind>/<key>/`` where the key is a hash of every input that
affects its bytes (package checksums, the init script, the module list, the builder's format
version). A directory counts as built only once its ``manifest.json`` exists; builds happen in a
temporary sibling directory that is renamed into place, so an interrupted build never leaves a
half-made artifact behind and a changed input rebuilds only what depends on it.

The default location is ``$XDG_CACHE_HOME/nubis`` or ``~/.cache/nubis``; not under /tmp, because
the nested test host mounts a fresh tmpfs there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """Return nubis's cache directory: ``$XDG_CACHE_HOME/nubis``, else ``~/.cache/nubis``."""
    base = os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "nubis"


def content_key(inputs: Mapping[str, Any]) -> str:
    """Return a short stable hash of a JSON-serialisable mapping of build inputs."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Cache:
    """A cache directory holding artifacts keyed by the hash of their inputs."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root if root is not None else default_cache_dir()).absolute()

    def path(self, kind: str, key: str) -> Path:
        """Return the directory of artifact ``kind``/``key`` (which may not exist yet)."""
        return self.root / kind / key

    def load(self, kind: str, key: str) -> dict[str, Any] | None:
        """Return the manifest of a built artifact, or None if it has not been built."""
        try:
            data = json.loads((self.path(kind, key) / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    @contextlib.contextmanager
    def building(self, kind: str, key: str) -> Iterator[Path]:
        """Give a scratch directory to build artifact ``kind``/``key`` in, then publish it.

        The caller writes its files and ``manifest.json`` into the yielded directory; on normal
        exit the directory is renamed into place atomically. If another process published the same
        key first, its result is kept and ours discarded (both hold the same bytes).
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = final.parent / f".build-{key}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        try:
            yield scratch
            if not (scratch / MANIFEST).exists():
                raise RuntimeError(f"build of {kind}/{key} wrote no manifest")
            if final.exists() and (final / MANIFEST).exists():
                return
            shutil.rmtree(final, ignore_errors=True)
            os.rename(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def scratch_dir(self, name: str) -> Path:
        """Return an empty per-process scratch directory under the cache (not under /tmp)."""
        path = self.root / "tmp" / f"{name}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write ``manifest.json`` into an artifact directory."""
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
