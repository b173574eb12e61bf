"""Triton kernels of genfast, installed as genfast.kernels. Importing this package needs triton."""

import os as _os

if _os.environ.get("TRITON_INTERPRET") == "1":
    from .interpreter import skip_repeated_patching

    skip_repeated_patching()
