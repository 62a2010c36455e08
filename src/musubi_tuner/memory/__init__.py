"""Pre-flight memory estimation (specs/memory_estimator.md): fake-tensor traces of the real step plus formulas."""
