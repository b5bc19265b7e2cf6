"""fp32 CPU GEMMs through oneDNN (``cpu_gemm``): choice rules, dispatch, accuracy against fp64.

The accuracy bar for oneDNN's fp32 products is backend-independent: every element within the
worst-case bound of fp32 summation, ``gamma_k * (|A| @ |B|)`` with ``gamma_k = k u / (1 - k u)``
(u = 2^-24; Higham, Accuracy and Stability of Numerical Algorithms, 3.1), and the mean error no
more than that of PyTorch's default ``torch.mm`` on the same inputs with ``onednn`` (k-blocked;
plus 10% for a BLAS that blocks differently), 3x with ``onednn_fast`` (one pass; measured 1.4-2x).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinytune.kernels import cpu_gemm
from tinytune.kernels.linear_ce import linear_cross_entropy
from tinytune.modules import Linear

needs_onednn = pytest.mark.skipif(not cpu_gemm.onednn_available(), reason="this PyTorch build has no oneDNN matmul")
U = 2.0**-24


@pytest.fixture
def backend():
    """Restores the process's cpu_gemm back end after a test that sets one."""
    saved = dict(cpu_gemm._STATE)
    yield cpu_gemm.set_cpu_gemm
    cpu_gemm._STATE.update(saved)


@pytest.fixture(params=["onednn", "onednn_fast"])
def onednn(backend, monkeypatch, request):
    """oneDNN (each variant) for every fp32 CPU GEMM, however small; counts the oneDNN calls."""
    if not cpu_gemm.onednn_available():
        pytest.skip("this PyTorch build has no oneDNN matmul")
    backend(request.param)
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 0)
    calls = []
    real = cpu_gemm._lp

    def counted(x, w, b=None, out=None):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, b, out=out)

    def counted_add(x, acc, w):
        calls.append((tuple(x.shape), tuple(w.shape), "add"))
        return real_add(x, acc, w)

    real_add = cpu_gemm._lp_add
    monkeypatch.setattr(cpu_gemm, "_lp", counted)
    monkeypatch.setattr(cpu_gemm, "_lp_add", counted_add)
    return calls


def _check_product(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``got`` ~ ``a @ b`` within fp32 summation's worst-case bound, mean error <= torch.mm's
    (``onednn``, + 10%) or 3x it (``onednn_fast``)."""
    ref = a.double() @ b.double()
    k = a.shape[1]
    gamma = k * U / (1 - k * U)
    bound = gamma * (a.double().abs() @ b.double().abs())
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound {float((err / bound).max()):.3f}"
    torch_err = (torch.mm(a, b).double() - ref).abs().mean()
    factor = 3.0 if cpu_gemm.cpu_gemm_backend() == "onednn_fast" else 1.1
    assert float(err.mean()) <= factor * float(torch_err) + 1e-12, (float(err.mean()), float(torch_err))


def test_choices(backend, monkeypatch):
    with pytest.raises(ValueError, match=r"cpu_gemm: 'mkl' is not one of auto \| torch \| onednn \| onednn_fast"):
        backend("mkl")
    assert backend("torch") == "torch (asked for)" and cpu_gemm.cpu_gemm_backend() == "torch"
    cpu_gemm._STATE["backend"] = None
    assert cpu_gemm.cpu_gemm_backend() == "torch"  # a process that never chose one
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: True)
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "AuthenticAMD")
    assert backend("auto") == "onednn (auto: AMD CPU, where MKL runs its generic code path)"
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "GenuineIntel")
    assert backend("auto") == "torch (auto: CPU vendor GenuineIntel)"
    assert backend("onednn_fast") == "onednn_fast (asked for; CPU vendor GenuineIntel)"
    monkeypatch.setattr(cpu_gemm, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu_gemm, "onednn_available", lambda: False)
    assert backend("auto") == "torch (auto: this PyTorch build has no usable oneDNN matmul)"
    for choice in ("onednn", "onednn_fast"):
        with pytest.raises(RuntimeError, match="no usable oneDNN matmul"):
            backend(choice)


@pytest.mark.parametrize("k", [1, 191, 192, 193, 200, 383, 384, 385, 576, 1000, 1536, 49152])
def test_k_blocks(backend, k):
    """``onednn`` sums k in blocks of at most 192 (two halves up to 384), in order; one pass for
    ``onednn_fast``."""
    backend("torch")
    bounds = cpu_gemm._k_bounds(k)
    assert bounds[0][0] == 0 and bounds[-1][1] == k and all(e == j for (_, e), (j, _) in zip(bounds, bounds[1:]))
    lengths = [e - j for j, e in bounds]
    if k <= 192:
        assert lengths == [k]
    elif k <= 384:
        assert lengths == [(k + 1) // 2, k // 2]
    else:
        assert lengths[:-1] == [192] * (len(lengths) - 1) and 0 < lengths[-1] <= 192
    if cpu_gemm.onednn_available():
        backend("onednn_fast")
        assert cpu_gemm._k_bounds(k) == [(0, k)]


@needs_onednn
@pytest.mark.parametrize("m,k,n", [(256, 1536, 192), (200, 2048, 64), (130, 300, 96)])
def test_blocked_onednn_is_as_accurate_as_torch(backend, m, k, n):
    """The k-blocked oneDNN product's error against fp64 is torch.mm's (same blocks as MKL on AMD:
    bitwise equal there; elsewhere within 10%), for row- and column-major operands."""
    backend("onednn")
    g = torch.Generator().manual_seed(k)
    for a, b in (
        (torch.randn(m, k, generator=g), torch.randn(n, k, generator=g).t()),
        (torch.randn(k, m, generator=g).t(), torch.randn(k, n, generator=g)),
    ):
        got = cpu_gemm.mm(a, b)
        ref = a.double() @ b.double()
        err, torch_err = (got.double() - ref).abs().mean(), (torch.mm(a, b).double() - ref).abs().mean()
        assert float(err) <= 1.1 * float(torch_err), (float(err), float(torch_err))
        backend("onednn_fast")
        fast_err = (cpu_gemm.mm(a, b).double() - ref).abs().mean()
        backend("onednn")
        assert float(err) < float(fast_err)  # the blocks are what makes it accurate


@needs_onednn
def test_weight_blocks_reused_per_weight_version(backend):
    """Inside reuse_weight_blocks a weight's k-block copies are made once; an in-place update of the
    weight (an optimizer step) gets fresh ones, never stale ones."""
    backend("onednn")
    g = torch.Generator().manual_seed(7)
    w = torch.randn(160, 576, generator=g)  # [n, k]: 3 strided column blocks of a row-major weight
    x1, x2 = torch.randn(128, 576, generator=g), torch.randn(130, 576, generator=g)
    plain = [cpu_gemm.mm(x, w.t()) for x in (x1, x2)]
    with cpu_gemm.reuse_weight_blocks():
        got = [cpu_gemm.mm(x, w.t()) for x in (x1, x2)]
        assert len(cpu_gemm._BLOCKS["cache"]) == 3
        w.mul_(-0.5)  # in place: new version
        updated = cpu_gemm.mm(x1, w.t())
        assert len(cpu_gemm._BLOCKS["cache"]) == 6
    assert cpu_gemm._BLOCKS["cache"] is None
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    assert torch.equal(updated, cpu_gemm.mm(x1, w.t()))
    assert torch.allclose(updated, -0.5 * plain[0], rtol=0, atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("m,k,n", [(257, 576, 192), (64, 1536, 96), (33, 40, 1000)])
@pytest.mark.parametrize("layout", ["nn", "tn", "nt"])
def test_mm_within_fp32_bound(onednn, m, k, n, layout):
    g = torch.Generator().manual_seed(m + k + n)
    a = torch.randn(m, k, generator=g) if layout != "tn" else torch.randn(k, m, generator=g).t()
    b = torch.randn(k, n, generator=g) if layout != "nt" else torch.randn(n, k, generator=g).t()
    got = cpu_gemm.mm(a, b)
    assert onednn and got.shape == (m, n) and got.is_contiguous()
    _check_product(got, a, b)


@needs_onednn
def test_mm_add_adds_in_the_epilogue_and_leaves_acc(onednn):
    g = torch.Generator().manual_seed(1)
    acc, a, b = torch.randn(96, 80, generator=g), torch.randn(64, 96, generator=g).t(), torch.randn(64, 80, generator=g)
    before = acc.clone()
    got = cpu_gemm.mm_add(acc, a, b)
    assert onednn and torch.equal(acc, before)  # a new tensor on the oneDNN path
    ref = before.double() + a.double() @ b.double()
    assert torch.allclose(
        got.double(), ref, rtol=0, atol=64 * U * float((a.abs() @ b.abs()).max() + before.abs().max())
    )


def _linear_grads(fn, x, w, b):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    y = fn(x, w, b)
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_linear_forward_and_backward_against_fp64(onednn, bias):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 70, 128, generator=g), torch.randn(96, 128, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    y, gx, gw, gb = _linear_grads(cpu_gemm.linear, x, w, b)
    assert len(onednn) == 3  # forward, grad_x, grad_w
    y64, gx64, gw64, gb64 = _linear_grads(F.linear, x.double(), w.double(), None if b is None else b.double())
    y32, gx32, gw32, _ = _linear_grads(F.linear, x, w, b)
    for got, ref, base in ((y, y64, y32), (gx, gx64, gx32), (gw, gw64, gw32)):
        err, base_err = (got.double() - ref).abs(), (base.double() - ref).abs()
        assert float(err.max()) <= 4 * float(base_err.max()) + 1e-5 and float(err.mean()) <= 3 * float(base_err.mean())
    if bias:
        assert torch.allclose(gb.double(), gb64, atol=1e-5)


@needs_onednn
def test_linear_frozen_weight_and_no_grad(onednn):
    x, w = torch.randn(40, 64, requires_grad=True), torch.randn(48, 64)
    cpu_gemm.linear(x, w).sum().backward()
    assert len(onednn) == 2 and w.grad is None  # forward and grad_x only
    assert torch.allclose(x.grad, w.sum(0).expand(40, 64), atol=1e-5)
    with torch.no_grad():
        y = cpu_gemm.linear(x, w)
    assert len(onednn) == 3 and y.grad_fn is None


@needs_onednn
def test_what_stays_on_torch(onednn, monkeypatch):
    w = torch.randn(48, 64)
    cpu_gemm.linear(torch.randn(8, 64).bfloat16(), w.bfloat16())  # bf16: PyTorch already uses oneDNN
    cpu_gemm.linear(torch.randn(8, 64).double(), w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: F.linear
        y = cpu_gemm.linear(torch.randn(8, 64), w)
    assert y.dtype == torch.bfloat16
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 8 * 64 * 48 + 1)  # below the size threshold
    cpu_gemm.linear(torch.randn(8, 64), w)
    cpu_gemm.mm(torch.randn(8, 64), w.t())
    assert onednn == []
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 9)  # fewer rows than the threshold (decoding)
    cpu_gemm.linear(torch.randn(8, 64), w)
    cpu_gemm.mm(torch.randn(8, 64), w.t())
    assert onednn == []
    cpu_gemm.linear(torch.randn(9, 64), w)
    assert len(onednn) == 1
    onednn.clear()
    cpu_gemm.set_cpu_gemm("torch")
    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 0)
    cpu_gemm.linear(torch.randn(8, 64), w)
    assert onednn == []


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    ours = Linear(16, 8)
    torch.manual_seed(0)
    ref = nn.Linear(16, 8)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    x = torch.randn(5, 16)
    assert torch.allclose(ours(x), ref(x), atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("ignored", [0, 37])
def test_fused_ce_on_onednn_matches_fp64(onednn, ignored):
    g = torch.Generator().manual_seed(3)
    n, d, v = 150, 64, 1000
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.1
    labels = torch.randint(0, v, (n,), generator=g)
    labels[:ignored] = -100

    def run(h, w, fused):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            loss = linear_cross_entropy(h, w, labels, chunk_size=64, reduction="mean")
        else:
            loss = F.cross_entropy(h @ w.t(), labels, ignore_index=-100)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    got = run(h, w, True)
    chunks = -(-(n - ignored) // 64)  # ignored rows are dropped before chunking
    assert len(onednn) == 3 * chunks  # per chunk: logits, grad_h, grad_w (the last ones added in the epilogue)
    assert sum(c[-1] == "add" for c in onednn) == chunks - 1
    ref = run(h.double(), w.double(), False)
    base = run(h, w, False)
    for x, r, b in zip(got, ref, base):
        err, base_err = (x.double() - r).abs().max(), (b.double() - r).abs().max()
        assert float(err) <= 4 * float(base_err) + 1e-6, (float(err), float(base_err))


@needs_onednn
def test_fused_ce_on_onednn_with_every_row_ignored(onednn):
    h, w = torch.randn(10, 32, requires_grad=True), torch.randn(100, 32, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.full((10,), -100), reduction="sum")
    loss.backward()
    assert float(loss) == 0.0 and torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(h.grad) == 0


def _model_grads(builder, dtype: torch.dtype, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = builder().to(dtype)
    with torch.no_grad():  # non-trivial LoRA B (zero at init) so every adapter gradient is exercised
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0.0, 0.05)
    hidden = model(tokens[:, :-1], return_hidden=True).flatten(0, 1)  # [b*s, d]
    loss = linear_cross_entropy(hidden, model.output_weight, tokens[:, 1:].flatten(), reduction="mean")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.detach(), **grads}


@needs_onednn
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_training_gradients_on_onednn_against_fp64(onednn, mode):
    """A whole step's loss and gradients (model GEMMs and fused CE on oneDNN) are no further from
    an fp64 run than PyTorch's default GEMMs are (4x on the max error, plus one fp32 rounding)."""
    from tinytune.models import lora_builders, qwen3

    builder = qwen3.qwen3_tiny if mode == "full" else lora_builders.lora_qwen3_tiny
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(5))
    got = _model_grads(builder, torch.float32, tokens)
    assert len(onednn) > 0
    cpu_gemm.set_cpu_gemm("torch")
    base = _model_grads(builder, torch.float32, tokens)
    ref = _model_grads(builder, torch.float64, tokens)
    assert got.keys() == ref.keys() and len(got) > 2
    for name in ref:
        err = float((got[name].double() - ref[name]).abs().max())
        base_err = float((base[name].double() - ref[name]).abs().max())
        scale = float(ref[name].abs().max())
        assert err <= 4 * base_err + 2 * U * scale, (name, err, base_err, scale)


@needs_onednn
@pytest.mark.parametrize("m,n", [(40, 300), (300, 40)])  # column tiles; row tiles
def test_tiled_k_blocked_products_equal_untiled(backend, monkeypatch, m, n):
    """Tiling a large k-blocked output changes no bit: every element sums the same k-blocks in the
    same order (forward with bias, x row- and column-major, and the in-place epilogue add)."""
    backend("onednn")
    g = torch.Generator().manual_seed(m)
    k = 450  # 3 k-blocks
    w, bias, acc = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    xs = (torch.randn(m, k, generator=g), torch.randn(k, m, generator=g).t())

    def products():
        return [(cpu_gemm._lp(x, w, bias), cpu_gemm._lp_add(x, acc.clone(), w)) for x in xs]

    untiled = products()
    monkeypatch.setattr(cpu_gemm, "TILED_FROM", 1000)
    monkeypatch.setattr(cpu_gemm, "TILE_OUT", 700)
    rows, cols = cpu_gemm._tiles(m, n)
    assert (rows, cols) != (m, n) and (rows == m or cols == n)
    for got, want in zip(products(), untiled):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    buf = torch.full((m, n), float("nan"))  # into a kept buffer (the fused CE's logits), tiled
    assert cpu_gemm._lp(xs[0], w, bias, out=buf) is buf and torch.equal(buf, untiled[0][0])
    monkeypatch.setattr(cpu_gemm, "TILED_FROM", m * n)  # and untiled
    buf.fill_(float("nan"))
    assert cpu_gemm._lp(xs[0], w, bias, out=buf) is buf and torch.equal(buf, untiled[0][0])
    ref = xs[0].double() @ w.double().t()
    assert torch.allclose(untiled[0][0].double(), ref + bias.double(), rtol=0, atol=1e-3)
    assert torch.allclose(untiled[0][1].double(), ref + acc.double(), rtol=0, atol=1e-3)


def test_recipes_print_the_fp32_cpu_gemm_back_end(backend):
    """The precision line a recipe prints names the GEMM back end and why (fp32 on the CPU only)."""
    from tinytune.training import Precision

    model = nn.Linear(4, 4)
    backend("torch")
    line = Precision.from_settings(False, torch.float32, torch.device("cpu")).describe(model)
    assert line.endswith("; fp32 CPU GEMMs: torch (asked for)"), line
    bf16 = Precision.from_settings(False, torch.bfloat16, torch.device("cpu")).describe(model.bfloat16())
    assert "GEMMs" not in bf16


@needs_onednn
@pytest.mark.parametrize("name", ["torch", "onednn", "onednn_fast"])
def test_thin_mm_runs_one_pass_only_under_onednn_fast(backend, monkeypatch, name):
    """LoRA's long-reduction rank-r products: oneDNN in one pass under onednn_fast (within the fp32
    bound, 3x torch's mean error at most), torch.mm's own bits under the other back ends and for
    what use_onednn refuses (bf16, products below MIN_MACS)."""
    backend(name)
    calls = []
    real = cpu_gemm.one_pass
    monkeypatch.setattr(cpu_gemm, "one_pass", lambda x, w, b=None: calls.append(tuple(x.shape)) or real(x, w, b))
    g = torch.Generator().manual_seed(3)
    x, a = torch.randn(1024, 576, generator=g), torch.randn(16, 576, generator=g)  # [N, in], A [r, in]
    grad = torch.randn(1024, 192, generator=g)  # [N, out]
    for lhs, rhs in ((x, a.t()), (a, x.t()), (grad.t()[:16], x), (x.t(), grad)):  # [N,r], [r,N], [r,in], [in,out]
        got = cpu_gemm.thin_mm(lhs, rhs)
        if name == "onednn_fast":
            _check_product(got, lhs, rhs)
        else:
            assert torch.equal(got, torch.mm(lhs, rhs))
    assert calls == ([(1024, 576), (16, 576), (16, 1024), (576, 1024)] if name == "onednn_fast" else [])
    calls.clear()
    cpu_gemm.thin_mm(x.bfloat16(), a.t().bfloat16())
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1024 * 576 * 16 + 1)
    assert torch.equal(cpu_gemm.thin_mm(x, a.t()), torch.mm(x, a.t()))
    assert calls == []


@needs_onednn
def test_tiled_product_holds_one_column_tiles_weight_copies_at_a_time(backend, monkeypatch):
    """A column-tiled k-blocked product (the fused CE's [chunk, V] logits) copies the weight's strided
    k-blocks tile by tile and drops them after each column tile: never a whole copy of the weight."""
    backend("onednn")
    g = torch.Generator().manual_seed(3)
    m, k, n = 40, 450, 300  # 3 k-blocks; column tiles of 16
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    want = cpu_gemm._lp(x, w)
    monkeypatch.setattr(cpu_gemm, "TILED_FROM", 1000)
    monkeypatch.setattr(cpu_gemm, "TILE_OUT", 700)
    rows, cols = cpu_gemm._tiles(m, n)
    assert rows == m and cols < n
    held, real = [], cpu_gemm._w_block

    def spy(wt, j, e):
        blk = real(wt, j, e)
        cache = cpu_gemm._BLOCKS["cache"] or {}
        held.append(sum(t.numel() for t in cache.values()))
        return blk

    monkeypatch.setattr(cpu_gemm, "_w_block", spy)
    assert torch.equal(cpu_gemm._lp(x, w), want)
    assert len(held) == 3 * -(-n // cols)  # every k-block of every column tile, copied once
    assert max(held) == cols * k < n * k  # one column tile's blocks at a time
    assert cpu_gemm._BLOCKS["cache"] is None
