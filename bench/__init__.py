"""Benchmark harness: chatstream side by side with a raw gRPC floor and an SSE peer (docs/benchmarks.md)."""
