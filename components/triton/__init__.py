"""Triton shared by the serving stages: the bundled tritonserver, model configs, repositories and their versions (see README.md)."""
