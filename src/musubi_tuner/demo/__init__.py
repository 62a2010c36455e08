"""Tiny random-weight model bundles in the official on-disk formats, synthetic datasets, and the demo pipeline."""
