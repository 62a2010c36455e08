"""Dataset layer: config schema and validation, data sources, buckets, frame extraction, cache I/O and caching drivers.

Architecture-independent: architectures are referred to by their short name (see ``architectures.py``) and supply
their encoders to the caching drivers as callables.
"""
