"""compress: the registered variants (pruned, structured, distilled, int8, ...) of the
trained model (see README.md)."""
