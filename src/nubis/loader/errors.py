"""The one error type every nubis kernel loader and boot configurator raises.

Kernel, initramfs and command-line contents come from the user, so every problem with them is
reported as a `LoaderError` carrying one sentence that says what is wrong, never as an exception
from deep inside a parser.
"""

from __future__ import annotations

__all__ = ["LoaderError"]


class LoaderError(ValueError):
    """A kernel, initramfs, command line or boot layout that nubis cannot load or place."""
