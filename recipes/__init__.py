"""Built-in recipes (YAML), installed as `lcpatch.recipes`."""
