"""A one-file code cache for nubis's own modules: a faster start without changing what runs.

A ``nubis`` launch imports about seventy nubis modules. Python's path-based import spends more
time finding, checking and reading each module's ``.pyc`` (about 100 µs per module on the
machines measured) than unmarshalling and running it, so a tenth of a launch went to import
machinery alone. The bundle holds every module's compiled code in one file, read once when
:mod:`nubis` is imported; a finder at the front of ``sys.meta_path`` then serves nubis's
modules from memory (about 45 µs per module).

What runs is the same code: each entry records its source file's size and modification time,
and an entry whose source file changed since the bundle was built (an edit, a ``git pull``)
is not used, so that module is imported from its source file as usual. A bundle made by
another Python version (the ``.pyc`` magic number), or one that cannot be read, is ignored.
Modules keep their ``__file__``, their source (tracebacks, ``inspect``) and their package
resources: the loader is :class:`importlib.machinery.SourceFileLoader` with only ``get_code``
answered from the bundle.

``scripts/install.sh`` builds the bundle (:func:`build_nubis`) after byte-compiling.
Without a bundle, or with ``NUBIS_NO_BUNDLE=1`` in the environment, nubis imports normally.
"""

from __future__ import annotations

import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import CodeType, ModuleType

# The import system's own module, loaded (frozen) in every interpreter: using it costs no import.
_external = sys.modules["_frozen_importlib_external"]

_FORMAT = b"nubis-bundle-2\n"

# module name -> (source path, is a package, source mtime in ns, source size, marshalled code)
_Entry = tuple[str, bool, int, int, memoryview]

# The file: the header, the index's length (8 bytes, little-endian), the index (marshalled:
# module name -> (source path, is a package, mtime in ns, size, code offset, code length), the
# offsets counted from the end of the index), then each module's marshalled code. A launch
# maps the file and unmarshals only the index and the modules it imports.
_Index = dict[str, tuple[str, bool, int, int, int, int]]


def bundle_path(package_dir: str) -> str:
    """Where the bundle of the package in ``package_dir`` lives (its ``__pycache__``)."""
    tag = sys.implementation.cache_tag
    return os.path.join(package_dir, "__pycache__", f"nubis-modules.{tag}.bundle")


def _header() -> bytes:
    magic: bytes = _external.MAGIC_NUMBER
    return _FORMAT + magic


def build(package_dir: str, package: str = "nubis") -> str:
    """Compile every module under ``package_dir`` into its bundle; return the bundle's path."""
    index: _Index = {}
    blobs: list[bytes] = []
    offset = 0
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        if "__init__.py" not in files:
            dirs[:] = []
            continue
        relative = os.path.relpath(root, package_dir)
        prefix = package if relative == "." else f"{package}.{relative.replace(os.sep, '.')}"
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            is_package = name == "__init__.py"
            module = prefix if is_package else f"{prefix}.{name[:-3]}"
            with open(path, "rb") as source:
                status = os.fstat(source.fileno())
                code = compile(source.read(), path, "exec", dont_inherit=True)
            blob = marshal.dumps(code)
            index[module] = (
                path,
                is_package,
                status.st_mtime_ns,
                status.st_size,
                offset,
                len(blob),
            )
            blobs.append(blob)
            offset += len(blob)
    packed_index = marshal.dumps(index)
    target = bundle_path(package_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    temporary = f"{target}.{os.getpid()}.tmp"
    with open(temporary, "wb") as out:
        out.write(_header())
        out.write(len(packed_index).to_bytes(8, "little"))
        out.write(packed_index)
        out.writelines(blobs)
    os.replace(temporary, target)
    return target


def load(package_dir: str) -> dict[str, _Entry] | None:
    """The bundle's entries, or ``None`` when there is no usable bundle."""
    import mmap  # nubis maps guest memory with it anyway

    try:
        with open(bundle_path(package_dir), "rb") as file:
            data = memoryview(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ))
    except (OSError, ValueError):  # ValueError: an empty file cannot be mapped
        return None
    header = _header()
    start = len(header) + 8
    if len(data) < start or data[: len(header)] != header:
        return None
    end = start + int.from_bytes(data[len(header) : start], "little")
    try:
        index: _Index = marshal.loads(data[start:end])
    except (EOFError, ValueError, TypeError):
        return None
    if not isinstance(index, dict):
        return None
    entries: dict[str, _Entry] = {}
    for name, (path, is_package, mtime_ns, size, offset, length) in index.items():
        if end + offset + length > len(data):
            return None  # a truncated file
        blob = data[end + offset : end + offset + length]
        entries[name] = (path, is_package, mtime_ns, size, blob)
    return entries


class _BundledLoader(_external.SourceFileLoader):  # type: ignore[misc,name-defined]
    """A source-file loader whose code comes from the bundle."""

    def __init__(self, fullname: str, path: str, code: memoryview) -> None:
        super().__init__(fullname, path)
        self._code = code

    def get_code(self, fullname: str) -> CodeType:
        code: CodeType = marshal.loads(self._code)
        return code


class BundleFinder:
    """A ``sys.meta_path`` finder for the modules in one bundle whose sources are unchanged."""

    def __init__(self, entries: dict[str, _Entry]) -> None:
        self._entries = entries

    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        entry = self._entries.get(fullname)
        if entry is None:
            return None
        source, is_package, mtime_ns, size, code = entry
        try:
            status = os.stat(source)
        except OSError:
            return None
        if status.st_mtime_ns != mtime_ns or status.st_size != size:
            return None  # edited since the bundle was built: import the source file
        spec: ModuleSpec = _external.spec_from_file_location(
            fullname,
            source,
            loader=_BundledLoader(fullname, source, code),
            submodule_search_locations=[os.path.dirname(source)] if is_package else None,
        )
        return spec

    def invalidate_caches(self) -> None:
        """Nothing is cached beyond the entries, which check their sources on every lookup."""


def install(package_dir: str) -> BundleFinder | None:
    """Serve the package's modules from its bundle, if there is one and it is enabled."""
    if os.environ.get("NUBIS_NO_BUNDLE") or sys.flags.optimize:
        return None
    entries = load(package_dir)
    if not entries:
        return None
    finder = BundleFinder(entries)
    sys.meta_path.insert(0, finder)
    return finder


def build_nubis() -> str:
    """Build the bundle of this nubis installation (``scripts/install.sh`` runs this)."""
    return build(os.path.dirname(os.path.abspath(__file__)))
