"""The Wan DiT (official key layout) and its loader."""
