"""Triton kernels, installed as llavamed_fast.kernels."""
