"""Bridges to other tools: PyTorch -> ONNX export with the name map, and PEFT adapters from trained deltas."""
