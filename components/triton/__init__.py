"""Triton as the serving stages share it: the bundled tritonserver, model configs,
repositories and their versions (see README.md)."""
