"""Triton kernels for lcpatch, installed as `lcpatch.kernels`.

`lambda_attention` has the signature and return convention of
`lcpatch.attention.lambda_reference.lambda_attention_reference`, the PyTorch spec it is tested
against. It runs `lambda_decode` (split-KV) for a few queries over a bounded cache when no
gradient is needed, `lambda_prefill` (forward + backward) otherwise, and falls back to the
reference, with a one-time warning, for what the kernels do not cover.
"""

# Nothing is imported at load time on purpose: when the repository root is on sys.path this
# folder is also importable as a top-level `kernels`, a name transformers probes (it belongs to
# the Hub kernels package), and an import of lcpatch from here would then be circular.


def lambda_attention(*args, **kwargs):
    """Λ attention with the Triton kernels; see `lcpatch.kernels.dispatch.lambda_attention`."""
    from .dispatch import lambda_attention as run

    return run(*args, **kwargs)
