"""genfast: fused kernels for the hot paths of generative models.

Every op runs on one of four backends, chosen per call with impl="auto" | "native" | "triton" |
"reference": the C++/CUDA extension genfast._C, Triton, or the plain-PyTorch reference in
genfast.reference that defines what the others compute.
"""

from . import _backend
from .attention import attention, attention_varlen
from .attention_merge import merge_attention
from .diffusion import (
    ddim_step,
    ddpm_step,
    euler_step,
    flow_match_euler_step,
    flow_match_heun_step,
)
from .flows import actnorm, affine_coupling, coupling_index, lu_weight
from .kvcache import kvcache_append
from .made import made_linear
from .nade import nade_conditionals, nade_log_prob, nade_sample
from .rotary import rotary
from .langevin import langevin_corrector_step, langevin_step, mala_accept, ve_sde_step, vp_sde_step
from .random import PhiloxGenerator

__version__ = "0.1.0"

_backend.warn_if_native_missing()


def build_info() -> dict:
    """What this installation can run: the compiled backends and CUDA archs, the CPU kernels'
    instruction set, versions, Triton."""
    native = _backend.native_module()
    info = dict(native.build_info()) if native is not None else {
        "backends": [], "cuda_archs": "", "cuda_version": None, "torch_version": None, "compiler": None,
        "native_error": _backend.native_error(),
    }
    # The instruction set the CPU kernels were picked for (GENFAST_CPU_CAPABILITY caps it).
    info["cpu_capability"] = native.cpu_capability() if native is not None else None
    info["genfast_version"] = __version__
    try:
        import triton

        info["triton_version"] = triton.__version__
    except ImportError:
        info["triton_version"] = None
    info["triton_error"] = _backend.triton_error()
    info["triton_interpret"] = _backend.triton_interpreted()
    return info


__all__ = [
    "PhiloxGenerator",
    "actnorm",
    "attention",
    "attention_varlen",
    "affine_coupling",
    "build_info",
    "coupling_index",
    "ddim_step",
    "ddpm_step",
    "euler_step",
    "flow_match_euler_step",
    "flow_match_heun_step",
    "kvcache_append",
    "langevin_corrector_step",
    "langevin_step",
    "lu_weight",
    "made_linear",
    "mala_accept",
    "merge_attention",
    "nade_conditionals",
    "nade_log_prob",
    "nade_sample",
    "rotary",
    "ve_sde_step",
    "vp_sde_step",
]
