"""Models built from the layers: the model config, the decoder, the fit checks
and the model factory."""
