"""Training: per-sample forget objectives and retain losses, the weightings (BalDRO), one forward pass that
computes what an objective declared, batching, the trainers and their checkpoints."""
