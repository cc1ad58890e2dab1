"""deploy: the chosen model to a registered target (local Triton, Vertex AI, KServe), checked,
or rolled back (see README.md)."""
