"""A training step run on fake tensors: the model, GPU-only behaviour emulated, the recorders."""
