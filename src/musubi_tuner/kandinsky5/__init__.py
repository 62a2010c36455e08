"""Kandinsky 5: task table, DiT, NABLA attention, loading and sampling (specs/kandinsky5.md)."""
