"""Triton kernels, each with a PyTorch reference: attribution scores (``attribution``), the
row-selective weight gradient (``row_grad``) and row-sparse SGD / AdamW (``sparse_optim``).

Stand-alone: this package imports nothing but torch (and, optionally, triton), so it can be
tested and reused on its own (the library that ships it installs it as its ``kernels``). What
the kernels share lives in ``dispatch`` (the :data:`~.dispatch.Backend` type and its rules, the
accumulation dtype, lazy ``@triton.jit``) and ``errors`` (the :class:`~.errors.KernelError`
family).
"""
