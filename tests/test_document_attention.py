"""CPU per-document attention vs SDPA with the dense block-diagonal mask (fp64 reference)."""

import pytest
import torch
import torch.nn.functional as F

from tinytune.modules.attention import attention, packed_causal_mask, seq_lens_to_document_ids
from tinytune.modules.document_attention import document_attention

MODES = ["gemm", "sdpa", "auto"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    """Every test runs on both per-document kernels (TINYTUNE_CPU_ATTENTION)."""
    monkeypatch.setenv("TINYTUNE_CPU_ATTENTION", request.param)
    return request.param


def _qkv(b, h, hkv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for n in (h, hkv, hkv)]


def _reference(q, k, v, seq_lens, scale=None):
    mask = packed_causal_mask(seq_lens_to_document_ids(seq_lens, q.shape[2]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2)])
def test_matches_dense_mask_values_and_gradients(mode, dtype, h, hkv):
    s = 41
    seq_lens = torch.tensor([[10, 1, 0, 30], [41, 0, 0, 0], [7, 7, 7, 20]])
    q, k, v = _qkv(3, h, hkv, s, 16, dtype)
    out = document_attention(q, k, v, seq_lens, softmax_scale=0.3)
    ref = _reference(q, k, v, seq_lens, scale=0.3)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    do = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)


def test_gradcheck_fp64(mode):
    seq_lens = torch.tensor([[3, 5], [8, 0]])
    q, k, v = _qkv(2, 2, 1, 8, 4, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda a, b, c: document_attention(a, b, c, seq_lens), (q, k, v))


def test_output_merges_heads_without_a_copy(mode):
    q, k, v = _qkv(2, 3, 3, 9, 8, torch.float32)
    out = document_attention(q, k, v, torch.tensor([[4, 5], [9, 0]]))
    assert out.shape == (2, 3, 9, 8) and out.transpose(1, 2).is_contiguous()


def test_attention_entry_point_uses_it_on_cpu(monkeypatch):
    from tinytune.modules import attention as attn_mod

    calls = []
    monkeypatch.setattr(attn_mod, "document_attention", lambda *a: calls.append(1) or _reference(*a[:4]))
    q, k, v = _qkv(1, 2, 2, 6, 4, torch.float32)
    attention(q, k, v, seq_lens=torch.tensor([[2, 4]]))
    attention(q, k, v, document_ids=torch.tensor([[0, 0, 1, 1, 1, 1]]))  # ids only: dense mask path
    assert len(calls) == 1


def test_bad_seq_lens_name_the_row(mode):
    q, k, v = _qkv(2, 2, 2, 6, 4, torch.float32)
    with pytest.raises(ValueError, match="row 1"):
        document_attention(q, k, v, torch.tensor([[2, 4], [3, 2]]))
    with pytest.raises(ValueError, match="row 0"):
        document_attention(q, k, v, torch.tensor([[-1, 7], [6, 0]]))


@pytest.mark.parametrize("h,hkv,d", [(9, 3, 64), (4, 2, 16), (2, 2, 8)])
def test_gemm_kernel_at_block_borders_no_further_from_fp64_than_sdpa(monkeypatch, h, hkv, d):
    """Documents of 1, 31, 32, 33, 64, 65 and 96 tokens (the GEMM path's query blocks are 32), fp32 and
    bf16: values and gradients no further from an fp64 reference than PyTorch's fused kernel's
    (bf16: the fused kernel rounds P and dS to bf16; the GEMM path keeps them in fp32)."""
    from tinytune.kernels import cpu_attention

    assert cpu_attention.BLOCK == 32
    seq_lens = torch.tensor([[1, 31, 32, 33, 64, 0], [65, 96, 0, 0, 0, 0]])
    s = int(seq_lens[0].sum())
    assert int(seq_lens[1].sum()) == s
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 0.0)):
        q, k, v = _qkv(2, h, hkv, s, d, torch.float64, seed=d)
        ref = _reference(q, k, v, seq_lens)
        do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do)
        errors = {}
        for m in ("gemm", "sdpa"):
            monkeypatch.setenv("TINYTUNE_CPU_ATTENTION", m)
            ql, kl, vl = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
            out = document_attention(ql, kl, vl, seq_lens)
            grads = torch.autograd.grad(out, (ql, kl, vl), do.to(dtype))
            errors[m] = [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]
        for name, g_err, s_err, r in zip(("out", "dq", "dk", "dv"), errors["gemm"], errors["sdpa"], (ref, *ref_grads)):
            # plus one rounding of the result in its dtype (bf16: 2^-8 of the largest value)
            one_rounding = r.abs().max().item() * (2**-8 if dtype == torch.bfloat16 else 0.0)
            assert g_err <= 1.25 * s_err + tol + one_rounding, (dtype, name, g_err, s_err)


def test_unknown_cpu_attention_mode_is_refused(monkeypatch):
    monkeypatch.setenv("TINYTUNE_CPU_ATTENTION", "flash")
    q, k, v = _qkv(1, 2, 2, 6, 4, torch.float32)
    with pytest.raises(ValueError, match=r"TINYTUNE_CPU_ATTENTION='flash': use one of auto \| gemm \| sdpa"):
        document_attention(q, k, v, torch.tensor([[2, 4]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_auto_takes_the_gemm_path_from_the_measured_length(monkeypatch, dtype):
    """auto: documents of at least GEMM_MIN_TOKENS[dtype] tokens go through the GEMM kernel, shorter
    ones (and dtypes without a threshold) through PyTorch's fused kernel; each document is counted."""
    from tinytune.kernels import cpu_attention
    from tinytune.modules import document_attention as da

    calls = []
    real = cpu_attention.gemm_attention_forward
    monkeypatch.setattr(da, "gemm_attention_forward", lambda q, *a: calls.append(q.shape[1]) or real(q, *a))
    monkeypatch.delenv("TINYTUNE_CPU_ATTENTION", raising=False)
    t = da.GEMM_MIN_TOKENS.get(dtype)
    lens = [t - 1, t, 3] if t else [40, 300, 3]
    q, k, v = _qkv(1, 2, 1, sum(lens), 8, dtype)
    out = document_attention(q, k, v, torch.tensor([lens]))
    assert calls == ([t] if t else [])
    ref = _reference(*(x.detach().double() for x in (q, k, v)), torch.tensor([lens]))
    torch.testing.assert_close(out.double(), ref, rtol=0.02, atol=0.02)
