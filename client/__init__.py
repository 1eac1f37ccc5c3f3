"""A small typed client for peftserve (sync and asyncio); needs grpcio and protobuf only."""
