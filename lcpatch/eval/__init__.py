"""Long-context quality measurements."""
