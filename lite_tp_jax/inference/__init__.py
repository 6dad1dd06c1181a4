"""Generation: sampling, the KV-cache generator, text streaming, and loading a
trained model."""
