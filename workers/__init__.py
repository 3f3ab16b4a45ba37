"""SlimMoA workers: the proposer and aggregator stage tasks, the inference engines and their host."""
