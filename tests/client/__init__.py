"""Tests of the client package: pure conversions, both twins over gRPC, the CLI, the wheel."""
