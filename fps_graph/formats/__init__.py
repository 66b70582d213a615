"""Saved, inspectable artifacts between stages: atomic output files, the masks file and the delta file (no torch)."""
