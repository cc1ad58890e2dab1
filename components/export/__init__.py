"""export: every variant as a checked ONNX file, with parity and the variant table's
measures (see README.md)."""
