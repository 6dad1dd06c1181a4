"""Training: YAML configs, byte-level data, and the ``lite-tp train`` loop."""
