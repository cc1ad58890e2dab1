"""compress: the registered model variants (pruned, structured, distilled, int8, ...) of the trained model (see README.md)."""
