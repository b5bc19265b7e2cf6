"""Fused linear + cross-entropy: chunked PyTorch path (CPU) and Triton path (interpreter / CUDA).

Rule for every check: error vs an fp64 reference <= error of the same-dtype eager torch op + small tol.
"""

import pytest
import torch
import torch.nn.functional as F

from tinytune.kernels import default_chunk_size, linear_ce, linear_cross_entropy
from tinytune.kernels._runtime import interpreting

IGN = -100


def _triton_step():
    if not interpreting():
        pytest.skip("Triton CPU test needs TRITON_INTERPRET=1 (the GPU tests cover CUDA)")
    from tinytune.kernels.ce_triton import triton_row_step

    return triton_row_step


def _lce(h, w, y, backend="torch", ignore_index=IGN, reduction="sum", num_tokens=None, chunk_size=None):
    if backend == "torch":
        return linear_cross_entropy(
            h, w, y, ignore_index=ignore_index, reduction=reduction, num_tokens=num_tokens, chunk_size=chunk_size
        )
    step = _triton_step()
    chunk_size = chunk_size or h.shape[0]
    return linear_ce._linear_ce(h, w, y.long(), ignore_index, reduction, num_tokens, chunk_size, step)


def _data(n, d, v, dtype, seed=0, ignore_frac=0.25, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * 1.5
    w = torch.randn(v, d, generator=g) / d**0.5 * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = IGN
    return h.to(device, dtype), w.to(device, dtype), y.to(device)


def _ref(h, w, y, reduction, dtype):
    """Eager torch loss and grads computed in `dtype` (logits upcast to fp32 as models do)."""
    h = h.detach().to(dtype).requires_grad_()
    w = w.detach().to(dtype).requires_grad_()
    logits = F.linear(h, w)
    if dtype != torch.float64:
        logits = logits.float()
    loss = F.cross_entropy(logits, y, ignore_index=IGN, reduction="sum")
    if reduction == "mean":
        loss = loss / (y != IGN).sum().clamp(min=1)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def _ours(h, w, y, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = _lce(h, w, y, **kw)
    loss.backward()
    return loss.detach().double(), h.grad.double(), w.grad.double()


def _err(a, b):
    return (a - b).abs().max().item()


def _check_against_reference(h, w, y, dtype, reduction="sum", tol=None, **kw):
    ref64 = _ref(h, w, y, reduction, torch.float64)
    same = _ref(h, w, y, reduction, dtype)
    ours = _ours(h, w, y, reduction=reduction, **kw)
    for name, o, s, r in zip(("loss", "grad_hidden", "grad_weight"), ours, same, ref64):
        scale = r.abs().max().item() + 1e-6
        t = tol if tol is not None else (1e-5 if dtype == torch.float32 else 2e-3) * scale
        assert _err(o, r) <= _err(s, r) + t, f"{name}: ours {_err(o, r):.3e} vs torch {_err(s, r):.3e} (tol {t:.1e})"


BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,v,chunk", [(1, 123, None), (17, 123, 4), (130, 123, 32), (33, 64, 33)])
def test_matches_reference(backend, dtype, n, v, chunk):
    h, w, y = _data(n, 24, v, dtype, seed=n)
    _check_against_reference(h, w, y, dtype, reduction="sum", chunk_size=chunk, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mean_vs_sum_and_num_tokens(backend, dtype):
    h, w, y = _data(40, 16, 50, dtype, seed=3)
    _check_against_reference(h, w, y, dtype, reduction="mean", chunk_size=8, backend=backend)
    s = _lce(h, w, y, backend, reduction="sum", chunk_size=8)
    m = _lce(h, w, y, backend, reduction="mean", chunk_size=8)
    count = (y != IGN).sum()
    torch.testing.assert_close(m, s / count)
    # explicit normaliser (e.g. label tokens across a gradient-accumulation window)
    nt = torch.tensor(1000)
    hh = h.clone().requires_grad_()
    m2 = _lce(hh, w, y, backend, reduction="mean", num_tokens=nt, chunk_size=8)
    torch.testing.assert_close(m2, s / 1000)
    m2.backward()
    hs = h.clone().requires_grad_()
    (_lce(hs, w, y, backend, reduction="sum", chunk_size=8) / 1000).backward()
    tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(hh.grad, hs.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_custom_and_all_ignored(backend):
    h, w, y = _data(12, 8, 20, torch.float32, seed=4)
    y2 = y.clone()
    y2[y2 == IGN] = 7  # the class 7 is ignored instead
    y2[::3] = 7
    ref = F.cross_entropy(F.linear(h, w), torch.where(y2 == 7, IGN, y2), ignore_index=IGN, reduction="sum")
    torch.testing.assert_close(_lce(h, w, y2, backend, ignore_index=7, chunk_size=5), ref)
    # all ignored: loss 0 (mean does not divide by zero), gradients exactly 0
    yi = torch.full((12,), IGN)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    for red in ("sum", "mean"):
        loss = _lce(hh, ww, yi, backend, reduction=red, chunk_size=5)
        assert loss.item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert hh.grad.abs().max().item() == 0.0 and ww.grad.abs().max().item() == 0.0


def test_batched_input_flattens():
    h, w, y = _data(2 * 9, 16, 31, torch.float32, seed=5)
    flat = linear_cross_entropy(h, w, y, chunk_size=4)
    batched = linear_cross_entropy(h.view(2, 9, 16), w, y.view(2, 9), chunk_size=4)
    torch.testing.assert_close(flat, batched)


def test_grad_scaling_and_frozen_weight():
    h, w, y = _data(20, 8, 30, torch.float32, seed=6)
    hh = h.clone().requires_grad_()
    (3.0 * linear_cross_entropy(hh, w, y, chunk_size=7)).backward()  # frozen weight: no weight grad stored
    href = h.clone().requires_grad_()
    (3.0 * F.cross_entropy(F.linear(href, w), y, ignore_index=IGN, reduction="sum")).backward()
    torch.testing.assert_close(hh.grad, href.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, y)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(h, w), y, ignore_index=IGN, reduction="sum"))


def test_default_chunk_size_respects_budget():
    c = default_chunk_size(100_000, 128_000, torch.bfloat16, budget_bytes=256 * 2**20)
    assert 8 <= c < 100_000 and c % 8 == 0
    assert c * 128_000 * (4 + 2 * 2) <= 256 * 2**20
    assert default_chunk_size(5, 10, torch.float32) == 5
    assert default_chunk_size(5, 10**9, torch.float32, budget_bytes=1) == 1
    # CUDA chunks are 4x larger by default: each chunk costs one pass over the fp32 [V, d] accumulator
    cpu, cuda = (default_chunk_size(100_000, 152_064, torch.bfloat16, cuda=x) for x in (False, True))
    assert 3.9 <= cuda / cpu <= 4.1 and cuda * 152_064 * (4 + 2 * 2) <= 2**30


def test_default_chunk_size_caps_cpu_rows_unless_a_budget_is_set(monkeypatch):
    """On CPU more than CPU_MAX_CHUNK_ROWS rows only grow the scratch buffers at the step's memory peak;
    an explicit budget (argument or TINYTUNE_CE_CHUNK_BYTES) is taken as given, other devices uncapped."""
    monkeypatch.delenv("TINYTUNE_CE_CHUNK_BYTES", raising=False)
    cap = linear_ce.CPU_MAX_CHUNK_ROWS
    # SmolLM2's vocab: the 256 MiB budget alone would give 455 (fp32) / 680 (bf16) rows
    assert default_chunk_size(1624, 49152, torch.float32, cpu=True) == cap
    assert default_chunk_size(1624, 49152, torch.bfloat16, cpu=True) == cap
    assert default_chunk_size(1624, 49152, torch.bfloat16) == 680  # e.g. an NPU: the budget alone
    assert default_chunk_size(100, 49152, torch.float32, cpu=True) == 100
    assert default_chunk_size(1624, 49152, torch.bfloat16, cuda=True) == 1624  # 1 GiB: 2730 rows
    assert default_chunk_size(1624, 49152, torch.float32, budget_bytes=256 * 2**20, cpu=True) == 448
    monkeypatch.setenv("TINYTUNE_CE_CHUNK_BYTES", str(256 * 2**20))
    assert default_chunk_size(1624, 49152, torch.float32, cpu=True) == 448
    # the budget still binds below the cap (Qwen's vocab in fp32: 145 rows fit in 256 MiB)
    monkeypatch.delenv("TINYTUNE_CE_CHUNK_BYTES")
    assert default_chunk_size(1624, 152_064, torch.float32, cpu=True) == 144


def test_cpu_call_uses_the_capped_chunk(monkeypatch):
    """linear_cross_entropy on CPU tensors asks for the capped size (what the step's memory relies on)."""
    monkeypatch.delenv("TINYTUNE_CE_CHUNK_BYTES", raising=False)
    seen = []
    real = linear_ce._linear_ce
    monkeypatch.setattr(linear_ce, "_linear_ce", lambda *a: seen.append(a[6]) or real(*a))
    h = torch.randn(600, 16, requires_grad=True)
    linear_cross_entropy(h, torch.randn(100, 16), torch.randint(0, 100, (600,)))
    assert seen == [linear_ce.CPU_MAX_CHUNK_ROWS]


def test_fp32_output_gemm_probe_is_false_on_cpu():
    """CPU has no out_dtype GEMM: the probe must say so (and the CPU path keeps the cast-and-add)."""
    assert linear_ce._fp32_gemm_ok(torch.device("cpu")) is False
    assert linear_ce._fp32_gemm_ok(torch.device("cpu"), torch.float16) is False


def test_chunks_never_hold_full_logits(monkeypatch):
    """The row step only ever sees [chunk, V] logits."""
    seen = []
    orig = linear_ce.torch_row_step

    def spy(logits, labels, ignore_index, grad_scale=None):
        seen.append(tuple(logits.shape))
        return orig(logits, labels, ignore_index, grad_scale)

    monkeypatch.setattr(linear_ce, "torch_row_step", spy)
    h, w, y = _data(50, 8, 40, torch.float32)
    linear_cross_entropy(h, w, y, chunk_size=16)
    kept = int((y != -100).sum())  # CPU drops ignored rows before chunking
    assert 0 < kept < 50
    assert seen == [(min(16, kept - i), 40) for i in range(0, kept, 16)]


def test_bad_inputs_have_clear_errors():
    h, w, y = _data(6, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(h, w, torch.full((6,), 10))
    with pytest.raises(ValueError, match="does not match weight dim"):
        linear_cross_entropy(h, w[:, :4], y)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError, match="num_tokens"):
        linear_cross_entropy(h, w, y, num_tokens=torch.tensor(3))
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, y[:5])
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(h, w.double(), y)


def test_second_backward_fails_loudly():
    """Stored grads are scaled in place; a retained second backward must error, not return wrong grads."""
    h, w, y = _data(10, 8, 20, torch.float32)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


# ---------------------------------------------------------------- GPU only: Triton path, bf16, big sizes
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,d,v", [(4099, 512, 32000), (2048, 1024, 151936)])
@pytest.mark.parametrize("chunk_size", [None, 600])
def test_gpu_triton_matches_reference(dtype, n, d, v, chunk_size):
    """Default (large) chunks and many small ones: the fp32 weight-gradient accumulation across chunks."""
    h, w, y = _data(n, d, v, dtype, seed=1, device="cuda")
    _check_against_reference(h, w, y, dtype, reduction="mean", chunk_size=chunk_size)


@pytest.mark.gpu
def test_gpu_peak_memory_below_unfused():
    n, d, v = 8192, 1024, 128256
    h, w, y = _data(n, d, v, torch.bfloat16, device="cuda")
    h.requires_grad_()
    w.requires_grad_()

    def peak(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        h.grad = w.grad = None
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda: linear_cross_entropy(h, w, y, reduction="mean"))
    plain = peak(lambda: F.cross_entropy(F.linear(h, w).float(), y, ignore_index=IGN))
    assert fused < plain / 4, (fused / 2**20, plain / 2**20)
