"""Reading the marker lines nubis's guest init prints on the console (see init.sh)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

USERSPACE = "NUBIS-USERSPACE"
EXIT_STATUS = "NUBIS-EXIT-STATUS="
POWEROFF = "NUBIS-POWEROFF"

_MARKER = re.compile(r"(NUBIS-[A-Z-]+)(?:=(\S*))?\s*$")


@dataclass(frozen=True)
class InitMarkers:
    """What a guest console log says about the init's progress."""

    userspace: bool = False
    modules_loaded: int | None = None
    module_failures: tuple[str, ...] = ()
    rootfs: bool = False
    exit_status: int | None = None
    poweroff: bool = False
    ending: str | None = None
    markers: tuple[tuple[str, str | None], ...] = field(default=())


def parse_markers(log: str | bytes) -> InitMarkers:
    """Parse every ``NUBIS-...`` marker in a console log (tolerating CRs and kernel noise).

    A marker counts only at the end of a line, possibly after other output on the same line, since
    the kernel may print on the console concurrently.
    """
    text = log.decode(errors="replace") if isinstance(log, bytes) else log
    found: list[tuple[str, str | None]] = []
    for line in text.replace("\r", "\n").splitlines():
        match = _MARKER.search(line)
        if match:
            found.append((match.group(1), match.group(2)))
    names = [name for name, _ in found]
    exit_status = None
    modules_loaded = None
    for name, value in found:
        if name == "NUBIS-EXIT-STATUS" and value is not None and value.isdigit():
            exit_status = int(value)
        if name == "NUBIS-MODULES-LOADED" and value is not None and value.isdigit():
            modules_loaded = int(value)
    endings = [
        n for n in names if n in ("NUBIS-POWEROFF", "NUBIS-SHELL", "NUBIS-INIT-EXIT", "NUBIS-HANG")
    ]
    return InitMarkers(
        userspace=USERSPACE in names,
        modules_loaded=modules_loaded,
        module_failures=tuple(v or "" for n, v in found if n == "NUBIS-MODULE-FAILED"),
        rootfs="NUBIS-ROOTFS" in names,
        exit_status=exit_status,
        poweroff=POWEROFF in names,
        ending=endings[-1] if endings else None,
        markers=tuple(found),
    )
