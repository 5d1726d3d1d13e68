"""Process groups, the DeepSpeed engine and (later) expert-parallel dispatch. The one place that maps modules to
parallelism."""
