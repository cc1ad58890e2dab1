"""torchship pipelines: the KFP DAG, its compiler and the command line."""
