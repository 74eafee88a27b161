"""Triton kernels of cca_fast (installed as ``cca_fast.kernels``), each with a PyTorch reference."""
