"""A GPU's grid stops at 65535 blocks on its second axis, where the Triton launchers of
affine_coupling, mala_accept, langevin_corrector_step (noise norms) and made_linear put a sample's
chunks or a layer's feature tiles: past it they raise, naming the limit, before launching (the
CUDA bindings check the same in csrc/cuda/launch.h's check_grid_y). Shapes that large need a
GPU's memory, so the check itself is tested here, on device objects alone."""

import pytest
import torch

pytest.importorskip("triton")

from genfast.kernels.common import MAX_GRID_1, check_grid_axis1  # noqa: E402


def test_grid_axis1_limit_is_named_on_a_gpu_only():
    cuda = torch.device("cuda")
    check_grid_axis1(cuda, "mala_accept", "a sample's element count", MAX_GRID_1 * 16384, 16384)
    with pytest.raises(ValueError, match=r"mala_accept: on a GPU, a sample's element count must be at most "
                                         r"1073725440, got 1073725441"):
        check_grid_axis1(cuda, "mala_accept", "a sample's element count", MAX_GRID_1 * 16384 + 1, 16384)
    check_grid_axis1(torch.device("cpu"), "mala_accept", "a sample's element count", 2 ** 40, 16384)
