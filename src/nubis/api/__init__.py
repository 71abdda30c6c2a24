"""REST API on a Unix socket (cloud-hypervisor's endpoints) and its remote client.

``server`` serves the API for a :class:`~nubis.vmm.lifecycle.VmmControl`, ``remote`` is the
``nubis-remote`` command, ``wire`` is the bit of HTTP/1.1 the server speaks, and ``openapi.json``
describes the API (:func:`openapi_document` loads it).
"""

from __future__ import annotations

from typing import Any


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 document of the REST API, parsed from the packaged ``openapi.json``."""
    import json
    from importlib import resources

    text = resources.files(__name__).joinpath("openapi.json").read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document
