"""The language-model quality study (issue 16): pretrained decoders from pip wheels, labelled text, every method at
the same trainable count. ``python -m bench.quality_lm.assets`` builds the models and splits first."""
