"""Side outputs of a run: the progress bar and metrics.jsonl, plots, trackers."""
