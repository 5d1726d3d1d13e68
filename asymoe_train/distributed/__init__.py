"""Process groups, the DeepSpeed engine, expert parallelism (groups, all-to-all dispatch, expert consolidation) and
the DeepSpeed MoE backend. The one place that maps modules to parallelism."""
