"""The speed model: FLOPs, the step's ops, their price on a GPU, the fitted constants, cost."""
