"""The training loop and what it runs on: run config, checkpoints, activation recompute, distributed
processes and FSDP, hardware detection, memory accounting."""
