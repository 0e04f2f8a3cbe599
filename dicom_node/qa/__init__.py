"""The second check: dose comparison, the verdict and the physicist's report."""
