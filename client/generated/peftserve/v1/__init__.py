"""Generated protobuf and gRPC stubs for the peftserve.v1 contract (``make protos``)."""
