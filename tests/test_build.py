"""What was built, and genfast without its native extension."""

import ctypes
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
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


def test_triton_interpreter_before_3_7_with_numpy_2_4_is_refused_naming_both(monkeypatch):
    assert _backend.interpreter_error("3.8.0", "2.4.6") is None
    assert _backend.interpreter_error("3.7.0+git1234", "2.5.0") is None
    assert _backend.interpreter_error("3.6.0", "2.3.5") is None
    why = _backend.interpreter_error("3.6.0", "2.4.6")
    assert "Triton 3.6.0" in why and "numpy 2.4.6" in why and "numpy<2.4 or triton>=3.7" in why
    triton = pytest.importorskip("triton")
    import numpy

    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.triton_error.cache_clear()
    try:
        assert not _backend.triton_runs_on("cpu") and "triton-lang/triton#9171" in _backend.triton_error()
        x = torch.randn(2, 8)
        with pytest.raises(RuntimeError, match="impl='triton' cannot run on cpu: Triton 3.6.0's interpreter"):
            genfast.ddim_step(x, x, 0.5, 0.7, impl="triton")
    finally:
        _backend.triton_error.cache_clear()


CPU_CAPABILITIES = ["default", "avx2", "avx512", "avx512_bf16", "avx512_amx"]  # narrowest first


def _pythons_with_capabilities(script, capabilities):
    """(stdout, stderr) of script in a fresh Python per capability (None: unset), run side by side."""
    processes = []
    for capability in capabilities:
        env = {k: v for k, v in os.environ.items() if k != "GENFAST_CPU_CAPABILITY"}
        if capability is not None:
            env["GENFAST_CPU_CAPABILITY"] = capability
        processes.append(subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env))
    return [process.communicate(timeout=300) for process in processes]


@pytest.mark.skipif(_backend.native_module() is None, reason="needs genfast._C")
def test_cpu_capability_is_the_widest_unless_capped():
    report = "import genfast; print(genfast.build_info()['cpu_capability'])"
    (widest, _), *capped = _pythons_with_capabilities(report, [None, *CPU_CAPABILITIES])
    widest = widest.strip()
    assert widest in CPU_CAPABILITIES
    for capability, (out, err) in zip(CPU_CAPABILITIES, capped):
        assert out.strip() == min(capability, widest, key=CPU_CAPABILITIES.index), err[-2000:]


def _linux_grants_amx_tiles() -> bool:
    """Whether this x86-64 Linux kernel offers AMX's tile data (ARCH_GET_XCOMP_SUPP's bit 18)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    supported = ctypes.c_uint64(0)
    arch_prctl, get_supported = 158, 0x1021  # SYS_arch_prctl on x86-64, ARCH_GET_XCOMP_SUPP
    return libc.syscall(arch_prctl, get_supported, ctypes.byref(supported)) == 0 and bool(supported.value >> 18 & 1)


@pytest.mark.skipif(_backend.native_module() is None, reason="needs genfast._C")
def test_a_cpu_with_amx_takes_its_tiles():
    """Where the CPU lists AMX's bfloat16 tiles (Linux's /proc/cpuinfo), the kernel offers their
    registers and the build's compiler had AMX, the CPU kernels take them (avx512_amx), in a fresh
    process and in this one (where pytest's faulthandler has set up a signal stack before genfast
    asked for the registers), unless capped: the attention tests of bfloat16 then run the tiles, and
    the narrower capabilities again in scripts/test."""
    try:
        flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    except (OSError, AttributeError):
        pytest.skip("no /proc/cpuinfo flags")
    if not {"amx_tile", "amx_bf16", "avx512_bf16", "avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        pytest.skip("the CPU has no AMX bfloat16 tiles")
    if not genfast.build_info()["cpu_amx_tiles"] or not _linux_grants_amx_tiles():
        pytest.skip("the build's compiler or the OS has no AMX tiles")
    [(out, err)] = _pythons_with_capabilities("import genfast; print(genfast.build_info()['cpu_capability'])",
                                              [None])
    assert out.strip() == "avx512_amx", err[-2000:]
    if not os.environ.get("GENFAST_CPU_CAPABILITY"):
        assert genfast.build_info()["cpu_capability"] == "avx512_amx"


@pytest.mark.skipif(_backend.native_module() is None, reason="needs genfast._C")
def test_unknown_cpu_capability_is_an_error_naming_the_variable():
    script = textwrap.dedent("""
        import torch, genfast
        q = torch.randn(1, 1, 4, 16)
        try:
            genfast.attention(q, q, q, impl="native")
        except Exception as error:
            print(error)
        else:
            print("ran")
    """)
    [(out, err)] = _pythons_with_capabilities(script, ["avx9"])
    assert "GENFAST_CPU_CAPABILITY must be default, avx2, avx512, avx512_bf16 or avx512_amx" in out, out + err[-2000:]
    assert "'avx9'" in out


def test_kernels_include_no_framework_header():
    """kernels/ is framework-free (CMake and the host emulator compile it alone): its quoted
    includes stay inside kernels/, and no angle include is torch's, ATen's, c10's, pybind11's or
    Python's."""
    root = Path(__file__).resolve().parents[1] / "kernels"
    framework = re.compile(r"#\s*include\s*<(torch|ATen|c10|pybind11|Python\.h)")
    quoted = re.compile(r'#\s*include\s*"([^"]+)"')
    files = [p for p in root.rglob("*")
             if p.suffix in {".h", ".cuh", ".cu", ".cpp"} and p.relative_to(root).parts[0] != "build"]
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        assert not framework.search(text), f"{path} includes a framework header"
        for name in quoted.findall(text):
            target = (path.parent / name).resolve()
            assert target.is_file() and root in target.parents, f"{path} includes {name}, outside kernels/"
