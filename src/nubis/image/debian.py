"""Debian packages through apt: resolve names to exact versions, download and unpack them.

Downloads come only through ``apt-get download`` (verified against the SHA-256 in apt's lists),
and are kept under ``<cache>/debs``. Resolving names needs ``apt-cache``, which rebuilds its
package cache on every call on machines that disable ``pkgcache.bin`` (about one second); the
answers are therefore memoised on disk, keyed by a fingerprint of apt's lists and configuration,
so a warm rebuild asks apt nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from nubis.image.cache import Cache, content_key, sha256_file
from nubis.image.errors import ImageError, PackageNotFoundError
from nubis.image.tools import require_tool, run_tool

log = logging.getLogger(__name__)

APT_LISTS = Path("/var/lib/apt/lists")
_APT_CONFIG_PATHS = (
    Path("/etc/apt"),
    Path("/etc/apt/preferences.d"),
    Path("/etc/apt/sources.list.d"),
)
_RECORD_FIELDS = ("Package", "Version", "Architecture", "SHA256", "Depends", "Pre-Depends")


@dataclass(frozen=True)
class DebPackage:
    """One exact Debian binary package as apt's lists describe it."""

    name: str
    version: str
    architecture: str
    sha256: str
    depends: tuple[str, ...] = ()

    @property
    def deb_name(self) -> str:
        """The file name this package's .deb is stored under in the cache."""
        version = self.version.replace(":", "%3a")
        return f"{self.name}_{version}_{self.architecture}.deb"


def parse_dependency_names(field: str) -> list[str]:
    """Return the package names of a Depends field, taking the first of each alternative."""
    names = []
    for clause in field.split(","):
        clause = clause.strip()
        if not clause:
            continue
        first = clause.split("|")[0].strip()
        name = re.split(r"[\s(:\[]", first, maxsplit=1)[0]
        if name:
            names.append(name)
    return names


def parse_records(text: str) -> list[dict[str, str]]:
    """Parse deb822 records (as printed by ``apt-cache show``) into dictionaries."""
    records: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last_key = ""
    for line in text.splitlines():
        if not line.strip():
            if current:
                records.append(current)
                current = {}
            continue
        if line[0] in " \t":
            if last_key:
                current[last_key] += "\n" + line.strip()
            continue
        key, _, value = line.partition(":")
        last_key = key
        current[key] = value.strip()
    if current:
        records.append(current)
    return records


def lists_fingerprint() -> str:
    """Return a hash of the state of apt's lists and configuration (names, sizes, mtimes)."""
    entries: list[list[object]] = []
    for directory in (APT_LISTS, *_APT_CONFIG_PATHS):
        try:
            children = sorted(os.scandir(directory), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        for entry in children:
            if entry.is_file():
                st = entry.stat()
                entries.append([str(directory), entry.name, st.st_size, st.st_mtime_ns])
    return content_key({"apt": entries})


class Apt:
    """Resolves, downloads and unpacks Debian packages into a nubis cache."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.deb_dir = cache.root / "debs"
        self._memo: dict[str, DebPackage] | None = None
        self._memo_path: Path | None = None

    def _ensure_lists(self) -> None:
        has_lists = any(
            p.name.endswith(("_Packages", "_Packages.lz4", "_Packages.xz", "_Packages.gz"))
            for p in APT_LISTS.glob("*_Packages*")
        )
        if not has_lists:
            log.info("apt's package lists are empty; running apt-get update")
            run_tool(["apt-get", "update", "-qq"], what="apt-get update")

    def _load_memo(self) -> dict[str, DebPackage]:
        if self._memo is None:
            self._ensure_lists()
            self._memo_path = self.cache.root / "apt" / f"resolved-{lists_fingerprint()}.json"
            self._memo = {}
            try:
                raw = json.loads(self._memo_path.read_text())
                for name, fields in raw.items():
                    fields["depends"] = tuple(fields["depends"])
                    self._memo[name] = DebPackage(**fields)
            except (FileNotFoundError, json.JSONDecodeError, TypeError, KeyError):
                self._memo = {}
        return self._memo

    def _save_memo(self) -> None:
        assert self._memo is not None and self._memo_path is not None
        self._memo_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in self._memo_path.parent.glob("resolved-*.json"):
            if stale != self._memo_path:
                stale.unlink(missing_ok=True)
        tmp = self._memo_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({k: asdict(v) for k, v in self._memo.items()}, sort_keys=True))
        os.replace(tmp, self._memo_path)

    @staticmethod
    def _show(names: Sequence[str]) -> str:
        proc = subprocess.run(
            [require_tool("apt-cache"), "show", "--no-all-versions", *names],
            capture_output=True,
            check=False,
        )
        # apt-cache leaves unknown names out, and fails only if it found none at all.
        if proc.returncode != 0 and b"No packages found" not in proc.stderr:
            last = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ImageError(f"apt-cache show failed with status {proc.returncode} ({last[0]}).")
        return proc.stdout.decode(errors="replace")

    def resolve(self, names: Iterable[str]) -> dict[str, DebPackage]:
        """Return the candidate version of each named package, raising if one is unknown."""
        memo = self._load_memo()
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in memo]
        if missing:
            out = self._show(missing)
            for record in parse_records(out):
                if not all(k in record for k in ("Package", "Version", "Architecture", "SHA256")):
                    continue
                deps = parse_dependency_names(record.get("Pre-Depends", ""))
                deps += parse_dependency_names(record.get("Depends", ""))
                memo.setdefault(
                    record["Package"],
                    DebPackage(
                        name=record["Package"],
                        version=record["Version"],
                        architecture=record["Architecture"],
                        sha256=record["SHA256"],
                        depends=tuple(dict.fromkeys(deps)),
                    ),
                )
            self._save_memo()
        unknown = [n for n in wanted if n not in memo]
        if unknown:
            raise PackageNotFoundError(
                f"The Debian package {unknown[0]!r} is not in apt's package lists "
                "(check the name, or run apt-get update)."
            )
        return {n: memo[n] for n in wanted}

    def try_resolve(self, names: Iterable[str]) -> dict[str, DebPackage]:
        """Like `resolve` but silently leave out names apt does not know (virtual packages)."""
        result: dict[str, DebPackage] = {}
        for name in names:
            try:
                result.update(self.resolve([name]))
            except PackageNotFoundError:
                continue
        return result

    def resolve_metapackage(self, meta: str, prefix: str) -> DebPackage:
        """Return the versioned package a metapackage depends on, e.g. the current kernel image.

        ``prefix`` selects which dependency is meant (``linux-image-`` for kernel metapackages).
        """
        package = self.resolve([meta])[meta]
        for dep in package.depends:
            if dep.startswith(prefix):
                return self.resolve([dep])[dep]
        raise PackageNotFoundError(
            f"The metapackage {meta!r} depends on no package whose name starts with {prefix!r}."
        )

    def download(self, package: DebPackage) -> Path:
        """Return the path of the package's .deb in the cache, downloading it if needed."""
        target = self.deb_dir / package.deb_name
        if target.exists():
            return target
        self.deb_dir.mkdir(parents=True, exist_ok=True)
        scratch = self.cache.scratch_dir(f"download-{package.name}")
        try:
            log.info("downloading %s %s", package.name, package.version)
            run_tool(
                [
                    "apt-get",
                    "download",
                    "-qq",
                    "-o",
                    "APT::Sandbox::User=root",
                    f"{package.name}={package.version}",
                ],
                what=f"Downloading the Debian package {package.name}",
                cwd=scratch,
            )
            debs = list(scratch.glob("*.deb"))
            if len(debs) != 1:
                raise ImageError(f"apt-get download of {package.name} produced {len(debs)} files.")
            got = sha256_file(debs[0])
            if got != package.sha256:
                raise ImageError(
                    f"The downloaded {package.deb_name} has SHA-256 {got}, "
                    f"not {package.sha256} as apt's lists say."
                )
            os.replace(debs[0], target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target

    def extract(self, package: DebPackage, dest: Path) -> Path:
        """Unpack the package's files into ``dest`` (created if needed) and return ``dest``."""
        deb = self.download(package)
        dest.mkdir(parents=True, exist_ok=True)
        run_tool(["dpkg-deb", "-x", str(deb), str(dest)], what=f"Unpacking {deb.name}")
        return dest


def package_key(packages: Sequence[DebPackage]) -> list[list[str]]:
    """Return the identity of packages for use in a content key (name, version, SHA-256)."""
    return [[p.name, p.version, p.sha256] for p in packages]
