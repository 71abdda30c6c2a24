"""Errors raised while building guest images.

Every failure is reported as one sentence that says what failed and why, so a command-line user
sees a clear message instead of a traceback.
"""

from __future__ import annotations


class ImageError(Exception):
    """A guest image could not be built."""


class MissingToolError(ImageError):
    """A host program that image building needs is not installed."""


class PackageNotFoundError(ImageError):
    """A Debian package is not known to apt on this machine."""
