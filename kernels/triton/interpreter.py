"""Makes Triton's interpreter (TRITON_INTERPRET=1) skip work it repeats on every device-function call.

A launch patches triton.language's builtins for the interpreter and restores them when the kernel
returns. A call of one @triton.jit function from another patches them again, without restoring:
it walks every member of triton.language, its tensor class and math module (inspect.getmembers),
about a millisecond a call. genfast's Philox and polynomial helpers are device functions called per
block, so that took 40% of its interpreted kernels' time (2^16 normals: 0.54 s, 0.33 s without the
repeats). Inside a launch the modules are patched already, so the second patching changes nothing
and is skipped here; a call whose modules are not patched yet goes through Triton's own code.
"""

import triton.language as tl

_triton_patch_lang = None  # Triton's own, once replaced


def _patched(module):
    """Whether a launch has replaced this module's builtins with the interpreter's."""
    load = getattr(module, "load", None)
    return load is not None and not tl.core.is_builtin(load)


def skip_repeated_patching():
    """Installs the shortcut once (idempotent); a Triton without the expected internals is left alone."""
    global _triton_patch_lang
    if _triton_patch_lang is not None:
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None:
        return

    def patch_lang(fn):
        langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
        if langs and all(_patched(lang) for lang in langs):
            return scope_type()  # nothing changed, nothing to restore
        return original(fn)

    _triton_patch_lang = original
    interpreter._patch_lang = patch_lang
