"""peftserve: a gRPC service for text generation from PEFT fine-tuned language models.

Subpackages: ``peftserve.v1`` (generated protobuf/gRPC stubs), ``peftserve.client`` (a small
typed client) and, with the ``server`` extra, ``peftserve.server``. This file lives next to the
generated stubs because protoc's imports (``from peftserve.v1 import ...``) need the real
package root there; see pyproject.toml's package-dir.
"""

__version__ = "0.1.0"
