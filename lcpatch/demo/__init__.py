"""`lcpatch demo` (run.py: perplexity by position, SmolLM2-135M-Instruct vanilla vs lcpatch recipes) and the
offline SmolLM2 loader it uses (smollm2.py)."""
