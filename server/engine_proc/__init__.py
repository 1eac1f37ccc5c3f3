"""The engine in a process of its own: a front-side proxy (``proxy``) and the engine host
(``host``, run as ``python -m peftserve.server.engine_proc.host``), joined by one socket.

The gRPC front (servicer, interceptors, auth, metrics, health) and the model loop then hold
separate GILs: the loop's Python work no longer waits behind the front's, and a flood of calls
is answered by the front without touching the model process. See docs/engine.md.
"""

from ..engine.engine import Engine
from .proxy import EngineProxy, RemoteRegistry

# What the server's parts talk to: the engine itself, or its proxy (the same interface).
AnyEngine = Engine | EngineProxy

__all__ = ["AnyEngine", "EngineProxy", "RemoteRegistry"]
