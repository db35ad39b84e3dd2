"""The run's log: ``metrics.jsonl`` (records), its header, rank 0's account of a run, wandb and the progress line."""
