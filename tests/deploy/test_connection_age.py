"""--max-connection-age-s: the server sends GOAWAY to aged connections, so long-lived clients
reconnect (and re-resolve a headless Service's name, finding replicas added since), while a
call in flight on the aged connection still finishes."""

from __future__ import annotations

import threading
import time

import grpc
from peftserve.client import PeftServeClient
from peftserve.client.channel import ChannelSettings, channel_options

from ..conftest import ServerThread


def test_aged_connections_are_closed_without_failing_calls() -> None:
    server = ServerThread(max_connection_age_s=1.0, engine_process=False)  # slows the worker
    try:
        server.wait_ready()
        # Each model step takes at least 10 ms (step listener, worker thread), so the 300-token
        # call below lasts at least 3 s: past the 1 s age whatever the machine.
        server.server.engine().add_step_listener(lambda _step: time.sleep(0.01))
        channel = grpc.insecure_channel(server.address)
        states: list[grpc.ChannelConnectivity] = []
        dropped = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            # READY, then IDLE: the server ended the connection (GOAWAY), not the client.
            if grpc.ChannelConnectivity.READY in states and state in (
                grpc.ChannelConnectivity.IDLE,
                grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            ):
                dropped.set()

        channel.subscribe(watch, try_to_connect=True)
        with PeftServeClient(server.address, channel=channel, timeout_s=60) as client:
            # A call spanning the age (min_new_tokens keeps it going) is not cut.
            started = time.monotonic()
            long = client.generate("abc", max_new_tokens=300, min_new_tokens=300)
            assert long.completion_tokens == 300 and time.monotonic() - started >= 3
            assert dropped.wait(30), states
            # The next call simply opens a new connection.
            assert client.generate("abc", max_new_tokens=2).completion_tokens == 2
        channel.unsubscribe(watch)
        channel.close()
    finally:
        server.stop(grace_s=1.0)


def test_off_by_default_and_the_client_caps_reconnect_backoff() -> None:
    from peftserve.server.app import _channel_options
    from peftserve.server.config import ServerConfig

    assert "grpc.max_connection_age_ms" not in dict(_channel_options(ServerConfig()))
    aged = ServerConfig(max_connection_age_s=300)
    assert dict(_channel_options(aged))["grpc.max_connection_age_ms"] == 300_000
    assert dict(channel_options(ChannelSettings()))["grpc.max_reconnect_backoff_ms"] == 10_000
