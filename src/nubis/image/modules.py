"""Kernel module load order from ``modules.dep``.

Debian's linux-image packages ship no ``modules.dep`` (their postinst runs depmod), so nubis runs
``depmod -b`` on the unpacked package and reads the result. Each line is
``path: dep-path dep-path ...``; the load order is a depth-first post-order over those edges, so
every module comes after everything it needs, whatever order the caller named them in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from nubis.image.errors import ImageError
from nubis.image.tools import run_tool

_SUFFIX = re.compile(r"\.ko(\.(xz|zst|gz))?$")


def module_name(path: str) -> str:
    """Return the canonical name of a module file (``kvm-amd.ko`` -> ``kvm_amd``)."""
    return _SUFFIX.sub("", path.rsplit("/", 1)[-1]).replace("-", "_")


def parse_modules_dep(text: str) -> dict[str, tuple[str, list[str]]]:
    """Map each module's canonical name to its path and the paths it depends on."""
    table: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, _, deps = line.partition(":")
        path = path.strip()
        table[module_name(path)] = (path, deps.split())
    return table


def parse_builtin(text: str) -> set[str]:
    """Return the canonical names listed in ``modules.builtin``."""
    return {module_name(line.strip()) for line in text.splitlines() if line.strip()}


def load_order(
    table: Mapping[str, tuple[str, list[str]]],
    wanted: Iterable[str],
    builtin: Iterable[str] = (),
    optional: Iterable[str] = (),
) -> list[str]:
    """Return the module paths to load, dependencies first, for the wanted module names.

    A wanted module that is built into the kernel is skipped; one that is neither a module nor
    built in is an error unless it is listed in ``optional``.
    """
    builtin_set = {module_name(n) for n in builtin}
    optional_set = {module_name(n) for n in optional}
    by_path = {path: name for name, (path, _) in table.items()}
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            raise ImageError(f"modules.dep has a dependency cycle through {name!r}.")
        visiting.add(name)
        path, deps = table[name]
        for dep in deps:
            dep_name = by_path.get(dep, module_name(dep))
            if dep_name not in table:
                raise ImageError(
                    f"modules.dep names {dep!r}, a dependency of {name!r}, but has no entry for it."
                )
            visit(dep_name)
        visiting.discard(name)
        done.add(name)
        order.append(path)

    for raw in wanted:
        name = module_name(raw)
        if name in table:
            visit(name)
        elif name in builtin_set or name in optional_set:
            continue
        else:
            raise ImageError(f"The kernel has no module named {raw!r} and does not build it in.")
    return order


def run_depmod(tree: Path, release: str) -> str:
    """Run depmod on an unpacked kernel package and return the text of its modules.dep."""
    run_tool(["depmod", "-b", str(tree), release], what="depmod")
    return (tree / "lib" / "modules" / release / "modules.dep").read_text()
