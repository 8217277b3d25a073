"""Every Triton kernel of megamoe.kernels against its plain PyTorch reference: outputs and all
gradients, on random shapes with empty experts, dropped slots, one row, no rows, unaligned
widths (not multiples of the tile), fp32 and bf16.

On a machine without a GPU the kernels run under Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported); with CUDA they run compiled on the GPU.
Shapes are tiny because the interpreter executes every program in Python.
"""
import os

import pytest
import torch

pytest.importorskip("triton", reason="megamoe's Triton kernels need triton (pip install 'megamoe[triton]')")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET!=1: the kernels cannot run here", allow_module_level=True)

from megamoe import kernels  # noqa: E402
from megamoe.dispatch.base import map_slots  # noqa: E402
from megamoe.kernels.activation import ACTIVATIONS, act_backward, act_forward, expert_act, expert_act_reference  # noqa: E402
from megamoe.kernels.bias import row_bias, row_bias_reference, segment_colsum, segment_colsum_reference  # noqa: E402
from megamoe.kernels.launch import Tile  # noqa: E402
from megamoe.kernels.rows import (combine, combine_reference, gather_rows, gather_sum, permute,  # noqa: E402
                                  permute_reference)
from megamoe.routing.base import RoutingDecision, counts_per_expert  # noqa: E402

kernels.load()
DTYPES = [torch.float32, torch.bfloat16]
# (tokens, slots per token, experts, width): one token, unaligned widths, more experts than rows.
SHAPES = [(1, 1, 3, 5), (13, 2, 4, 37), (9, 3, 16, 8), (0, 2, 4, 6)]


def _tol(dtype):
    # Kernels accumulate in fp32 and round once; the reference is computed in fp32 from the
    # same (rounded) inputs, so bf16 results differ by about one bf16 ulp.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


def _slots(num_tokens, top_k, num_experts, *, drop: bool, seed: int):
    """A random slot map: some experts get no rows; with ``drop`` some slots are -1."""
    gen = torch.Generator().manual_seed(seed)
    used = torch.randperm(num_experts, generator=gen)[: max(1, num_experts // 2)]
    ids_TK = used[torch.randint(len(used), (num_tokens, top_k), generator=gen)]
    if drop and ids_TK.numel():
        ids_TK = torch.where(torch.rand(ids_TK.shape, generator=gen) < 0.3, torch.full_like(ids_TK, -1), ids_TK)
    decision = RoutingDecision(expert_ids_TK=ids_TK.to(DEVICE), weights_TK=torch.ones(ids_TK.shape, device=DEVICE),
                               tokens_per_expert_E=counts_per_expert(ids_TK, num_experts).to(DEVICE),
                               dropless=not drop)
    return map_slots(decision, num_experts, inverse=True)


def _leaf(t, dtype):
    return t.to(device=DEVICE, dtype=dtype).requires_grad_(True)


def _ref_leaf(t):
    """fp32 copy of a (possibly bf16) leaf for the reference computation."""
    return t.detach().float().requires_grad_(True)


def test_map_slots_inverse_and_order():
    slots = _slots(13, 3, 5, drop=True, seed=1)
    rows = torch.arange(slots.slot_idx_R.numel(), device=DEVICE)
    flat = slots.row_of_slot_TK.reshape(-1)
    assert torch.equal(flat[slots.slot_idx_R], rows)                      # inverse of the routed order
    assert int((flat >= 0).sum()) == slots.slot_idx_R.numel()            # every other slot is -1
    assert torch.equal(slots.token_idx_R, slots.slot_idx_R // 3)


@pytest.mark.parametrize("bound", [100, 30, 23])
def test_map_slots_static_rows_pad_to_the_bound(bound):
    """With a host-side bound on the kept slots, R = min(T*K, bound) rows: the kept rows in the
    exact order first, then padding rows (dropped slots) that no slot maps to, counted in the
    last expert's group."""
    gen = torch.Generator().manual_seed(5)
    ids_TK = torch.randint(5, (13, 3), generator=gen)
    ids_TK = torch.where(torch.rand(ids_TK.shape, generator=gen) < 0.5, -1, ids_TK).to(DEVICE)
    counts_E = counts_per_expert(ids_TK, 5)
    kept = int(counts_E.sum())
    assert kept == 23  # the last bound: every row kept, no padding
    decision = RoutingDecision(expert_ids_TK=ids_TK, weights_TK=torch.ones(ids_TK.shape, device=DEVICE),
                               tokens_per_expert_E=counts_E, kept_bound=bound)
    exact = map_slots(decision, 5, inverse=True)
    padded = map_slots(decision, 5, inverse=True, static_rows=True)
    num_rows = min(39, bound)
    assert padded.slot_idx_R.numel() == num_rows and exact.slot_idx_R.numel() == kept
    assert torch.equal(padded.slot_idx_R[:kept], exact.slot_idx_R)
    assert padded.valid_R.tolist() == [True] * kept + [False] * (num_rows - kept)
    assert torch.equal(padded.row_of_slot_TK, exact.row_of_slot_TK)  # padding rows are nobody's
    assert (ids_TK.reshape(-1)[padded.slot_idx_R[kept:]] == -1).all()
    sizes = padded.group_sizes(counts_E)
    assert torch.equal(sizes[:-1], counts_E[:-1]) and int(sizes.sum()) == num_rows
    assert exact.group_sizes(counts_E) is counts_E


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("drop", [False, True])
def test_permute_matches_reference(dtype, shape, drop):
    num_tokens, top_k, num_experts, dim = shape
    slots = _slots(num_tokens, top_k, num_experts, drop=drop, seed=sum(shape))
    x = _leaf(torch.randn(num_tokens, dim), dtype)
    y = permute(x, slots.token_idx_R, slots.row_of_slot_TK)
    g = torch.randn(y.shape, device=DEVICE, dtype=dtype)
    (g_x,) = torch.autograd.grad(y, x, g)
    xr = _ref_leaf(x)
    yr = permute_reference(xr, slots.token_idx_R, slots.row_of_slot_TK)
    (g_xr,) = torch.autograd.grad(yr, xr, g.float())
    assert y.dtype == dtype and y.shape == (slots.slot_idx_R.numel(), dim)
    assert torch.equal(y.float(), yr)                                    # a gather is exact
    torch.testing.assert_close(g_x.float(), g_xr, **_tol(dtype))


def _padded_slots():
    """Slots of 11 tokens, top-2 over 4 experts, some dropped, padded to 22 static rows."""
    gen = torch.Generator().manual_seed(9)
    ids_TK = torch.randint(4, (11, 2), generator=gen)
    ids_TK = torch.where(torch.rand(ids_TK.shape, generator=gen) < 0.4, -1, ids_TK).to(DEVICE)
    decision = RoutingDecision(expert_ids_TK=ids_TK, weights_TK=torch.ones(ids_TK.shape, device=DEVICE),
                               tokens_per_expert_E=counts_per_expert(ids_TK, 4), kept_bound=22)
    slots = map_slots(decision, 4, inverse=True, static_rows=True)
    assert not slots.valid_R.all()
    return slots


@pytest.mark.parametrize("dtype", DTYPES)
def test_permute_writes_zero_rows_for_index_minus_one(dtype):
    """Padding rows (index -1, see map_slots' static_rows) come out as exact zeros and send no
    gradient to any token."""
    slots = _padded_slots()
    idx = slots.gather_idx_R
    x = _leaf(torch.randn(11, 37), dtype)
    y = permute(x, idx, slots.row_of_slot_TK)
    g = torch.randn(y.shape, device=DEVICE, dtype=dtype)
    (g_x,) = torch.autograd.grad(y, x, g)
    xr = _ref_leaf(x)
    yr = permute_reference(xr, idx, slots.row_of_slot_TK)
    (g_xr,) = torch.autograd.grad(yr, xr, g.float())
    assert torch.equal(y.float(), yr) and not y[~slots.valid_R].any()
    torch.testing.assert_close(g_x.float(), g_xr, **_tol(dtype))


def test_combine_sends_no_gradient_to_padding_rows():
    """No slot reads a padding row, so the combine (kernel or not) gives it an exact zero
    gradient, like every other row that no token sums."""
    from megamoe.dispatch.base import combine_rows

    slots = _padded_slots()
    y = _leaf(torch.randn(slots.slot_idx_R.numel(), 5), torch.float32)
    g = torch.randn(11, 5, device=DEVICE)
    (g_kernel,) = torch.autograd.grad(combine_rows(y, slots, use_kernels=True), y, g)
    (g_plain,) = torch.autograd.grad(combine_rows(y, slots), y, g)
    assert not g_kernel[~slots.valid_R].any()
    assert torch.equal(g_kernel, g_plain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("drop", [False, True])
def test_combine_matches_reference(dtype, shape, drop):
    num_tokens, top_k, num_experts, dim = shape
    slots = _slots(num_tokens, top_k, num_experts, drop=drop, seed=sum(shape) + 7)
    y = _leaf(torch.randn(slots.slot_idx_R.numel(), dim), dtype)
    out = combine(y, slots.token_idx_R, slots.row_of_slot_TK)
    g = torch.randn(out.shape, device=DEVICE, dtype=dtype)
    (g_y,) = torch.autograd.grad(out, y, g)
    yr = _ref_leaf(y)
    outr = combine_reference(yr, slots.token_idx_R, slots.row_of_slot_TK)
    (g_yr,) = torch.autograd.grad(outr, yr, g.float())
    assert out.dtype == dtype and out.shape == (num_tokens, dim)
    torch.testing.assert_close(out.float(), outr, **_tol(dtype))
    assert torch.equal(g_y.float(), g_yr)                                # its backward is a gather: exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("weighted", [True, False])
def test_expert_act_matches_reference(dtype, activation, weighted):
    gated = ACTIVATIONS[activation][1]
    for rows, inter in [(0, 4), (1, 1), (19, 23)]:
        h = _leaf(torch.randn(rows, (2 if gated else 1) * inter) * 2, dtype)
        w = _leaf(torch.rand(rows), torch.float32) if weighted else None
        a = expert_act(h, w, activation)
        g = torch.randn(a.shape, device=DEVICE, dtype=dtype)
        leaves = [h] + ([w] if weighted else [])
        grads = torch.autograd.grad(a, leaves, g)
        ref_leaves = [_ref_leaf(t) for t in leaves]
        ar = expert_act_reference(ref_leaves[0], ref_leaves[1] if weighted else None, activation)
        ref_grads = torch.autograd.grad(ar, ref_leaves, g.float())
        assert a.dtype == dtype and a.shape == (rows, inter)
        torch.testing.assert_close(a.float(), ar, **_tol(dtype))
        for got, want in zip(grads, ref_grads):
            assert got.dtype == (torch.float32 if got.shape == (rows,) else dtype)
            torch.testing.assert_close(got.float(), want, **_tol(dtype))


def _groups(sizes):
    """(offs_E int32, expert_of_row_R) for group sizes in expert order."""
    counts = torch.tensor(sizes, dtype=torch.int64, device=DEVICE)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    return offs, torch.arange(len(sizes), device=DEVICE).repeat_interleave(counts)


# Group sizes: empty experts (first, middle, last), one row, and a group longer than a row block.
GROUPS = [[0, 3, 0, 1, 40, 0], [1], [0, 0], [7, 0, 5]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("weighted", [True, False])
def test_expert_act_with_bias_matches_reference(dtype, activation, weighted):
    gated = ACTIVATIONS[activation][1]
    for sizes, inter in zip(GROUPS, [23, 1, 4, 9]):
        offs, expert_of_row = _groups(sizes)
        rows, width = sum(sizes), (2 if gated else 1) * inter
        h = _leaf(torch.randn(rows, width) * 2, dtype)
        b = _leaf(torch.randn(len(sizes), width), dtype)
        w = _leaf(torch.rand(rows), torch.float32) if weighted else None
        a = expert_act(h, w, activation, b, expert_of_row, offs)
        g = torch.randn(a.shape, device=DEVICE, dtype=dtype)
        leaves = [h, b] + ([w] if weighted else [])
        grads = torch.autograd.grad(a, leaves, g)
        ref = [_ref_leaf(t) for t in leaves]
        ar = expert_act_reference(ref[0], ref[2] if weighted else None, activation, ref[1], expert_of_row, offs)
        ref_grads = torch.autograd.grad(ar, ref, g.float())
        torch.testing.assert_close(a.float(), ar, **_tol(dtype))
        for name, got, want in zip(["h", "b", "w"], grads, ref_grads):
            assert got.dtype == (torch.float32 if name == "w" else dtype)
            # In bf16 the bias gradient sums up to 40 row gradients each rounded to bf16 (as the
            # unfused path does), so it carries about sqrt(40) bf16 ulps.
            tol = dict(rtol=2e-2, atol=0.1) if name == "b" and dtype == torch.bfloat16 else _tol(dtype)
            torch.testing.assert_close(got.float(), want, **tol, msg=lambda m: f"{sizes} {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_row_bias_matches_reference(dtype, weighted):
    for sizes, dim in zip(GROUPS, [37, 1, 5, 8]):
        offs, expert_of_row = _groups(sizes)
        rows = sum(sizes)
        y = _leaf(torch.randn(rows, dim), dtype)
        b = _leaf(torch.randn(len(sizes), dim), dtype)
        w = _leaf(torch.rand(rows), torch.float32) if weighted else None
        out = row_bias(y, b, expert_of_row, offs, w)
        g = torch.randn(out.shape, device=DEVICE, dtype=dtype)
        leaves = [y, b] + ([w] if weighted else [])
        grads = torch.autograd.grad(out, leaves, g)
        ref = [_ref_leaf(t) for t in leaves]
        want_out = row_bias_reference(ref[0], ref[1], expert_of_row, offs, ref[2] if weighted else None)
        ref_grads = torch.autograd.grad(want_out, ref, g.float())
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), want_out, **_tol(dtype))
        for name, got, want in zip(["y", "b", "w"], grads, ref_grads):
            torch.testing.assert_close(got.float(), want, **_tol(dtype), msg=lambda m: f"{sizes} {name}: {m}")


def test_frozen_biases_and_weights_get_no_gradient_and_the_rest_is_unchanged():
    """Only what requires a gradient gets one (the skipped sums cost nothing): frozen biases
    (adapter-only fine-tuning) leave the input gradients as they were."""
    offs, expert_of_row = _groups(GROUPS[0])
    rows = sum(GROUPS[0])
    y, h = torch.randn(rows, 8, device=DEVICE), torch.randn(rows, 10, device=DEVICE)
    b_y, b_h = torch.randn(6, 8, device=DEVICE), torch.randn(6, 10, device=DEVICE)
    w = torch.rand(rows, device=DEVICE)
    g_y, g_h = torch.randn(rows, 8, device=DEVICE), torch.randn(rows, 5, device=DEVICE)

    def grads(frozen: bool):
        leaves = [t.clone().requires_grad_(True) for t in (y, b_y, w, h, b_h)]
        for i in ((1, 2, 4) if frozen else ()):
            leaves[i].requires_grad_(False)
        out = (row_bias(leaves[0], leaves[1], expert_of_row, offs, leaves[2]) * g_y).sum()
        out = out + (expert_act(leaves[3], None, "swiglu", leaves[4], expert_of_row, offs) * g_h).sum()
        out.backward()
        return [t.grad for t in leaves]

    trained, frozen = grads(False), grads(True)
    assert [g is None for g in frozen] == [False, True, True, False, True]
    assert torch.equal(frozen[0], trained[0]) and torch.equal(frozen[3], trained[3])


def test_segment_colsum_is_exact_per_expert_and_deterministic():
    offs, _ = _groups(GROUPS[0])
    src = torch.randn(sum(GROUPS[0]), 300, device=DEVICE)
    scale = torch.rand(src.shape[0], device=DEVICE)
    got = segment_colsum(src, offs, scale)
    torch.testing.assert_close(got, segment_colsum_reference(src, offs, scale), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, segment_colsum(src, offs, scale))
    assert torch.equal(got[[0, 2, 5]], torch.zeros(3, 300, device=DEVICE))  # empty experts: exact zeros
    assert torch.equal(segment_colsum(src, offs)[3], src[3])  # a one-row group is that row


@pytest.mark.parametrize("splits", [2, 3, 50])
def test_segment_colsum_split_rows_match_one_pass(splits):
    # Runs of whole row blocks per expert (more splits than an expert has rows included),
    # summed in split order: same sums, exact zeros for empty experts, deterministic.
    offs, _ = _groups(GROUPS[0])
    src = torch.randn(sum(GROUPS[0]), 20, device=DEVICE)
    scale = torch.rand(src.shape[0], device=DEVICE)
    got = segment_colsum(src, offs, scale, splits=splits)
    torch.testing.assert_close(got, segment_colsum_reference(src, offs, scale), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, segment_colsum(src, offs, scale, splits=splits))
    assert torch.equal(got[[0, 2, 5]], torch.zeros(3, 20, device=DEVICE))


def test_segment_colsum_splits_long_groups_of_few_experts():
    # Two experts owning 2000 rows: the default cuts each group into runs (4 here).
    from megamoe.kernels.bias import _colsum_splits

    assert _colsum_splits(2000, 2, 1) == 4 and _colsum_splits(2000, 64, 8) == 1
    offs = torch.tensor([1500, 2000], device=DEVICE, dtype=torch.int32)
    src = torch.randn(2000, 3, device=DEVICE)
    torch.testing.assert_close(segment_colsum(src, offs), segment_colsum_reference(src, offs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activation", ["swiglu", "gelu_tanh"])
def test_column_chunks_and_row_blocks_match_one_tile(activation):
    """Widths spanning several column chunks (the backward's loop, the forward's 2-D grid) and
    a partial last row block give the same numbers as one wide tile."""
    gated = ACTIVATIONS[activation][1]
    small = Tile(block_rows=4, block_cols=8, num_warps=1)
    h = torch.randn(11, (2 if gated else 1) * 21, device=DEVICE)
    w = torch.rand(11, device=DEVICE)
    g = torch.randn(11, 21, device=DEVICE)
    torch.testing.assert_close(act_forward(h, w, activation, tile=small), act_forward(h, w, activation))
    for got, want in zip(act_backward(g, h, w, activation, tile=small), act_backward(g, h, w, activation)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    slots = _slots(7, 2, 3, drop=True, seed=3)
    x = torch.randn(7, 21, device=DEVICE)
    assert torch.equal(gather_rows(x, slots.token_idx_R, tile=small), x[slots.token_idx_R])
    y = torch.randn(slots.slot_idx_R.numel(), 21, device=DEVICE)
    torch.testing.assert_close(gather_sum(y, slots.row_of_slot_TK, tile=small),
                               combine_reference(y, slots.token_idx_R, slots.row_of_slot_TK))


def test_combine_is_deterministic_and_exact_for_one_slot_per_token():
    slots = _slots(10, 1, 4, drop=False, seed=5)
    y = torch.randn(10, 9, device=DEVICE)
    out = combine(y, slots.token_idx_R, slots.row_of_slot_TK)
    assert torch.equal(out[slots.token_idx_R], y)
    assert torch.equal(out, combine(y, slots.token_idx_R, slots.row_of_slot_TK))


def test_every_configurable_activation_has_a_function_and_a_kernel():
    from megamoe.activations import activation_fn
    from megamoe.config import ACTIVATIONS as CONFIGURABLE, GATED_ACTIVATIONS

    assert set(ACTIVATIONS) == set(CONFIGURABLE)
    for name in CONFIGURABLE:
        assert ACTIVATIONS[name][1] == (name in GATED_ACTIVATIONS)
        assert torch.isfinite(activation_fn(name)(torch.linspace(-3, 3, 7))).all()
    with pytest.raises(ValueError, match="unknown activation 'tanh'; known: swiglu"):
        activation_fn("tanh")


def test_kernels_refuse_mixed_devices_and_bad_widths():
    h = torch.randn(3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="even pre-activation width"):
        expert_act(h, None, "swiglu")
    with pytest.raises(ValueError, match="no fused kernel for activation"):
        act_forward(h, None, "tanh")
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="different devices"):
            gather_rows(h, torch.zeros(2, dtype=torch.int64))
