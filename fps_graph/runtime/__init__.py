"""Stage 3, ONNX Runtime: sessions, provider choice, and streaming calibration data into statistics."""
