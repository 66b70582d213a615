"""Stage 1, data readers: calibration and training samples (images, arrays, text) turned into batches of model inputs."""
from fps_graph._moved import moved

# until round 2 these were importable from fps_graph.data (then a module); they live in fps_graph.data.sources
__getattr__ = moved(__name__, {name: f"fps_graph.data.sources:{name}" for name in (
    "ImageOptions", "InputSpec", "Loader", "Source", "ArraySource", "ImageSource", "IMAGENET_MEAN", "IMAGENET_STD")})
