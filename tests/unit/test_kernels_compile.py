"""Every Triton kernel of megamoe.kernels compiles for an H100 (sm_90), without a GPU.

The CPU tests run the kernels under Triton's interpreter, which executes the Python and so
accepts code that compiled Triton rejects (a ``@triton.jit`` helper whose returns differ in
type across constexpr branches, for one). Triton's compiler needs no GPU to produce PTX and
a cubin, so this test compiles each kernel in each of its constexpr variants (flags on and
off, every activation kind) in a subprocess that imports triton without the interpreter.
Kernels are found by name (``_*_kernel`` in the kernel modules): a new kernel is covered
without editing this file, and a new constexpr parameter fails here until it gets values.
"""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="megamoe's Triton kernels need triton (pip install 'megamoe[triton]')")

SCRIPT = textwrap.dedent("""
    import itertools
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from megamoe.kernels import activation, bias, rows

    TARGET = GPUTarget("cuda", 90, 32)
    # Element types of pointer arguments that are not the activations' bf16.
    POINTERS = {"e_ptr": "*i64", "idx_ptr": "*i64", "row_ptr": "*i64", "offs_ptr": "*i32", "scale_ptr": "*fp32",
                "gw_ptr": "*fp32"}
    FP32_OUT = {"_segment_colsum_kernel", "_row_dot_kernel"}  # kernels writing fp32 results
    CONSTEXPRS = {"KIND": sorted({kind for kind, _ in activation.ACTIVATIONS.values()}),
                  "BLOCK_R": [4], "BLOCK_T": [4], "BLOCK_C": [128]}

    def variants(params):
        flags = [p for p in params if p not in CONSTEXPRS]
        bad = [p for p in flags if not (p.startswith("HAS_") or p == "GATED")]
        assert not bad, f"no test values for constexpr parameters {bad}: add them to CONSTEXPRS"
        fixed = {p: CONSTEXPRS[p][0] for p in params if p in CONSTEXPRS}
        for values in itertools.product([False, True], repeat=len(flags)):
            yield {**fixed, **dict(zip(flags, values))}
        for p in params:  # the other values of a multi-valued constexpr, flags on
            for value in CONSTEXPRS.get(p, [])[1:]:
                yield {**fixed, **{f: True for f in flags}, p: value}

    @triton.jit
    def _probe(x_ptr):
        triton.language.store(x_ptr, 1.0)

    try:  # the compiler can run here at all (NVIDIA backend, ptxas)
        triton.compile(ASTSource(fn=_probe, signature={"x_ptr": "*fp32"}), target=TARGET)
    except Exception as exc:
        print("toolchain:", exc)
        raise SystemExit(3)
    count = 0
    for module in (activation, bias, rows):
        for name, kernel in sorted(vars(module).items()):
            if not (name.startswith("_") and name.endswith("_kernel") and isinstance(kernel, triton.JITFunction)):
                continue
            consts = [p.name for p in kernel.params if p.is_constexpr]
            signature = {}
            for p in kernel.params:
                if p.is_constexpr:
                    signature[p.name] = "constexpr"
                elif p.name.endswith("_ptr"):
                    default = "*fp32" if p.name == "out_ptr" and name in FP32_OUT else "*bf16"
                    signature[p.name] = POINTERS.get(p.name, default)
                else:
                    signature[p.name] = "i32"
            for constexprs in variants(consts):
                try:
                    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)
                except Exception as exc:
                    raise SystemExit(f"{module.__name__}.{name} {constexprs} does not compile: {exc}")
                count += 1
    print("compiled", count)
""")


def test_every_kernel_compiles_for_sm90(tmp_path):
    script = tmp_path / "compile_kernels.py"  # a file: @triton.jit reads its function's source
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode == 3:  # not even a one-line kernel compiles: no NVIDIA backend or ptxas here
        pytest.skip(f"triton cannot compile for sm_90 here: {proc.stdout[-400:]}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-1000:]
    assert "compiled" in proc.stdout
