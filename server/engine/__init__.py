"""The generation engine: batching, adapters and decoding around ``PeftModel.generate``.

Nothing in this package knows about gRPC or protobuf; the servicer translates.
"""
