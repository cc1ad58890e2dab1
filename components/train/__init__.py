"""train: one DDP training loop run by torchrun, Kubeflow Trainer, Vertex AI or local
workers (see README.md)."""
