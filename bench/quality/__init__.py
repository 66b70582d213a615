"""Selection-quality experiments on real pretrained weights (issue 5): FPS against GPS, random, magnitude, full.

* ``python -m bench.quality.crepe [--quick]``  - CREPE tiny pitch tracker adapting to noisy audio.
* ``python -m bench.quality.vision [--quick]`` - small ViT and CNN pretrained on MNIST, transferred few-shot.
"""
