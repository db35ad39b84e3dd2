"""The run's state: checkpoints and what they hold, resume (same or new batch plan), the run's identity, stop signals and failures."""
