"""Checkpoint loading and saving: Hugging Face folders and tensors, Orbax."""
