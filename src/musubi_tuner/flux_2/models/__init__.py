"""FLUX.2 transformer and its checkpoint loading."""
