"""The LoRA family: adapter config, the adapter layer, the walk that injects it, and the merges."""
