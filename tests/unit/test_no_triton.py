"""Triton is an optional extra: without it megamoe imports, the CPU layer runs, ``auto`` never
asks for the kernels on CPU, and asking for them explicitly fails with the install command.
Runs in a subprocess in which ``import triton`` fails, whatever this environment has."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # make `import triton` raise ImportError
    import pytest
    import torch
    from megamoe import ExpertConfig, MoEConfig, MoELayer, RouterConfig, kernels

    assert not kernels.available()
    cfg = MoEConfig(hidden_size=16, num_experts=4, experts=ExpertConfig(intermediate_size=32),
                    router=RouterConfig(top_k=2))
    x = torch.randn(10, 16, requires_grad=True)
    MoELayer(cfg)(x).sum().backward()
    assert x.grad is not None
    forced = MoEConfig(hidden_size=16, num_experts=4, experts=ExpertConfig(intermediate_size=32, impl="triton"))
    with pytest.raises(ImportError, match=r"pip install 'megamoe\\[triton\\]'"):
        MoELayer(forced)(torch.randn(4, 16))
    with pytest.raises(ImportError, match="triton"):
        kernels.load()
    print("ok")
""")


def test_layer_works_and_errors_clearly_without_triton():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr
