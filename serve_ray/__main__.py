"""``python -m peftserve.ray`` (``make serve-ray``): peftserve on a local Ray head, 127.0.0.1.

Deploys ``serve_config.yaml`` (or ``--config``), prints the gRPC address, and serves until
Ctrl-C or SIGTERM, then drains the replicas and stops every Ray process it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from . import local


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftserve.ray", description=__doc__)
    parser.add_argument("--config", type=Path, default=local.CONFIG_PATH, help="Serve config")
    parser.add_argument("--grpc-port", type=int, default=None, help="override grpc_options.port")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs the local head offers")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    config = local.with_overrides(local.load_config(args.config), grpc_port=args.grpc_port)
    local.start_head(num_cpus=args.num_cpus)
    try:
        address = local.deploy(config)
        print(f"peftserve on Ray Serve: gRPC at {address}", flush=True)
        print(f"  try: peftserve --target {address} generate 'hello' --adapter upper", flush=True)
        print("  Ctrl-C stops it (replicas drain, the local Ray head stops).", flush=True)
        stop.wait()
    finally:
        local.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
