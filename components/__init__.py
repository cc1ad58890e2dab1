"""torchship stages: pure functions, one module per stage."""
