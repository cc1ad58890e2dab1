"""tune-serving: Triton's serving settings for the chosen model, measured on one
tritonserver (see README.md)."""
