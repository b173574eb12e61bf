"""What was built, and genfast without its native extension."""

import os
import subprocess
import sys
import textwrap

import torch

import genfast
from genfast import _backend


def test_build_info_reports_backends_and_versions():
    info = genfast.build_info()
    assert info["genfast_version"] == genfast.__version__
    if _backend.native_module() is not None:
        assert "cpu" in info["backends"]
        assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
        if "cuda" in info["backends"]:
            assert info["cuda_archs"] and info["cuda_version"]
    assert "triton_version" in info


def test_import_without_native_extension_falls_back_with_one_warning():
    script = textwrap.dedent("""
        import sys, warnings
        class BlockNative:
            def find_spec(self, name, path=None, target=None):
                if name == "genfast._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, BlockNative())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import genfast
        messages = [str(w.message) for w in caught if "genfast._C" in str(w.message)]
        assert len(messages) == 1, messages
        import torch
        x = torch.randn(2, 8)
        out = genfast.ddim_step(x, x, 0.5, 0.7)            # auto: the reference
        assert torch.isfinite(out).all()
        try:
            genfast.ddim_step(x, x, 0.5, 0.7, impl="native")
        except RuntimeError as error:
            assert "impl='native' cannot run on cpu" in str(error), error
        else:
            raise AssertionError("impl='native' ran without the extension")
        assert genfast.build_info()["backends"] == []
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "GENFAST_QUIET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_auto_picks_native_on_cpu_when_built():
    expected = "native" if _backend.native_runs_on("cpu") else "reference"
    assert _backend.resolve_impl("auto", torch.device("cpu")) == expected
