"""Selection-quality experiments on real pretrained weights (issues 5 and 13).

* ``python -m bench.quality [--quick]``        - the variant study: every rule on every experiment, paired.
* ``python -m bench.quality.crepe [--quick]``  - CREPE tiny pitch tracker adapting to noisy audio.
* ``python -m bench.quality.vision [--quick]`` - small ViT and CNN pretrained on MNIST, transferred few-shot.
"""
