"""Tasks: what a model learns (examples, batches, loss, metrics, prediction); the loop in
`lorakit.training.loop` runs any of them."""
