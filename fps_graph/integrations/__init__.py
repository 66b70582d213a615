"""Bridges to other tools: PyTorch -> ONNX export (more to come: Hugging Face, PEFT, Ray)."""
