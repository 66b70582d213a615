"""Stage 2, the ONNX graph: loading models, finding scored layers and their PyTorch names, observing and patching."""
