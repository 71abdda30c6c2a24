"""Host tools that image building runs, and the Debian packages that provide them.

Image building shells out to a few Debian tools (apt, dpkg-deb, lz4, depmod, mke2fs). A missing
tool is reported by naming the package to install instead of failing with a bare ENOENT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from nubis.image.errors import ImageError, MissingToolError

#: The Debian package that provides each host tool nubis runs.
TOOL_PACKAGES: Mapping[str, str] = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "lz4": "lz4",
    "xz": "xz-utils",
    "depmod": "kmod",
    "mke2fs": "e2fsprogs",
    "qemu-system-x86_64": "qemu-system-x86",
}

_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def require_tool(name: str) -> str:
    """Return the absolute path of host tool ``name`` or raise `MissingToolError` naming its package."""
    path = shutil.which(name)
    if path is None:
        for directory in _SBIN_DIRS:
            candidate = os.path.join(directory, name)
            if os.access(candidate, os.X_OK):
                path = candidate
                break
    if path is None:
        package = TOOL_PACKAGES.get(name, name)
        raise MissingToolError(
            f"The host tool {name!r} is not installed; install the Debian package {package!r} "
            f"(apt-get install {package})."
        )
    return path


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    input: bytes | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """Run a host tool and return its standard output, raising `ImageError` if it fails.

    ``argv[0]`` is looked up with `require_tool`; ``what`` names the step for the error message.
    """
    exe = require_tool(argv[0])
    full_env = None if env is None else {**os.environ, **env}
    proc = subprocess.run(
        [exe, *argv[1:]],
        input=input,
        capture_output=True,
        cwd=cwd,
        env=full_env,
        check=False,
    )
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        last = detail[-1] if detail else "no error output"
        raise ImageError(f"{what} failed: {argv[0]} exited with status {proc.returncode} ({last}).")
    return proc.stdout
