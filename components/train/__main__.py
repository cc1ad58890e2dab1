"""`python -m torchship.components.train`: a training worker (run by torch.distributed.run) or a
node of a Kubeflow / Vertex AI job; see `stage.main`."""

from torchship.components.train.stage import main

main()
