"""peftserve server: a grpc.aio service over a batching PEFT generation engine."""
