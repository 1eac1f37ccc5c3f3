"""peftserve on Ray Serve: the unchanged gRPC contract through Ray's proxy (extra ``[ray]``).

``build_app`` is the Serve application builder named by ``serve_config.yaml``
(``import_path: peftserve.ray:build_app``); ``proxy`` holds the functions Ray's gRPC proxy
registers the services with; ``local`` runs it all on a local head (``make serve-ray``).
Importing this package does not import Ray, so ``local`` can prepare Ray's environment first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["build_app"]


def build_app(args: dict[str, Any]) -> Application:
    """See ``app.build_app``."""
    from .app import build_app as build

    return build(args)
