"""benchmark: latency and throughput on a real Triton server, local or remote (see README.md)."""
