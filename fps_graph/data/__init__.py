"""Stage 1, data readers: calibration and training samples (images, arrays) turned into batches of model inputs."""
