"""Stage 1, data readers: calibration and training samples (images, arrays, text) turned into batches of model inputs."""
