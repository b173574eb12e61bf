"""Triton kernels of genfast, installed as genfast.kernels. Importing this package needs triton."""
