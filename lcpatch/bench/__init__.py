"""`lcpatch bench NAME`: cost.py (prefill, decode and memory of generate() against context length, per recipe),
attention.py (the Triton kernels against SDPA and FlexAttention, CUDA), decode.py (lcpatch's fast decode next to
transformers' own); their options are in lcpatch.cli.bench, which builds them without torch. What two of them share:
presets.py (the models they run, of the shapes in shapes.py), timing.py (one measured generate()), report.py (the
table and figure next to the results)."""
