"""Weights in and out of other ecosystems: Hugging Face."""
