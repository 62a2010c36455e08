"""Wan 2.1 / 2.2 (T2V, I2V, FLF2V, Fun-Control, the two-expert A14B models, TI2V-5B): specs/wan.md."""
