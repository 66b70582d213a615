"""Stage 5, training (PyTorch): sparse deltas attached to modules, and the `train` job."""
