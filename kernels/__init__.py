"""Triton kernels for lcpatch, installed as `lcpatch.kernels`."""
