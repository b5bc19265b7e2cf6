"""Triton flash-attention kernels: forward, backward preprocess, dK/dV pass and dQ pass.

Layouts: q/o/do ``[b, h, s, d]``, k/v ``[b, h_kv, s, d]`` (any strides), lse/delta ``[b, h, s]`` fp32.
GQA: query head ``h`` reads kv head ``h // (h / h_kv)``; K/V are never expanded.
Packed documents: per-token int32 tables ``doc_id``, ``doc_start``, ``doc_end`` (``[b, s]``) give each
token's document and its ``[start, end)`` span. Each program derives its loop bounds from the spans
of its first/last row, so key (or query) blocks wholly outside the documents it touches are never
visited; inside the visited range a ``doc_id`` equality mask (plus causal ``n <= m``) is applied.
Only blocks on the causal diagonal, on a document boundary or at the sequence tail build a mask; the
others (every pair visible) skip it.
The softmax runs in base 2 (``exp2``) with ``qk_scale = softmax_scale * log2(e)``; the stored
log-sum-exp is in natural-log units.
The backward is deterministic: dK/dV are produced by one program per (kv head, key block) that loops
over all query heads of its group, dQ by one program per (head, query block); no atomics.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from tinytune.kernels._runtime import interpreting

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _configs(names, candidates):
    """Autotune configs ``(block_a, block_b, num_warps, num_stages)``; the last one is the smallest.

    Under the interpreter a single small config (autotune with more crashes there); with
    ``TINYTUNE_AUTOTUNE=0`` only the last, smallest candidate, which fits in shared memory for every
    dtype and head dim (no benchmarking: fastest start-up, lower speed).
    """
    a, b = names
    if interpreting():
        return [triton.Config({a: 32, b: 32}, num_warps=1, num_stages=1)]
    if os.environ.get("TINYTUNE_AUTOTUNE", "1") in ("0", "false", "False"):
        candidates = candidates[-1:]
    return [triton.Config({a: x, b: y}, num_warps=w, num_stages=st) for (x, y, w, st) in candidates]


# Autotuning is keyed on the power-of-two bucket of the sequence length (S_BUCKET), not on S itself:
# with variable lengths padded to a multiple of 8, keying on S would re-benchmark every new length.
_KEY = ["S_BUCKET", "BLOCK_D", "CAUSAL", "HAS_DOCS", "GROUP", "F32"]
_FWD_CONFIGS = _configs(
    ("BLOCK_M", "BLOCK_N"), [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
)
_DKDV_CONFIGS = _configs(("BLOCK_M", "BLOCK_N"), [(64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 2)])
_DQ_CONFIGS = _configs(("BLOCK_M", "BLOCK_N"), [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)])


def s_bucket(s: int) -> int:
    """Autotune bucket of a sequence length (next power of two, at least 64)."""
    return max(64, triton.next_power_of_2(int(s)))


@triton.jit
def _kv_range(
    doc_start_ptr,
    doc_end_ptr,
    m0,
    S,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Key range [lo, hi) visited by the query block starting at m0 (lo aligned to BLOCK_N)."""
    m_last = tl.minimum(m0 + BLOCK_M, S) - 1
    lo = 0
    hi = S
    if HAS_DOCS:
        lo = tl.load(doc_start_ptr + m0)
        hi = tl.load(doc_end_ptr + m_last)
    if CAUSAL:
        hi = tl.minimum(hi, m_last + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _q_range(
    doc_start_ptr,
    doc_end_ptr,
    n0,
    S,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Query range [lo, hi) that can attend to the key block starting at n0 (lo aligned to BLOCK_M)."""
    n_last = tl.minimum(n0 + BLOCK_N, S) - 1
    lo = 0
    hi = S
    if HAS_DOCS:
        lo = tl.load(doc_start_ptr + n0)
        hi = tl.load(doc_end_ptr + n_last)
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def _kv_free_range(
    doc_start_ptr, doc_end_ptr, m0, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr
):
    """Keys [lo, hi) visible to *every* query of the block at m0: key blocks inside need no mask."""
    m_last = tl.minimum(m0 + BLOCK_M, S) - 1
    lo = 0
    hi = S
    if HAS_DOCS:
        ds0 = tl.load(doc_start_ptr + m0)
        ds1 = tl.load(doc_start_ptr + m_last)
        lo = tl.where(ds0 == ds1, ds0, S)  # a block spanning two documents always needs the mask
        hi = tl.load(doc_end_ptr + m0)
    if CAUSAL:
        hi = tl.minimum(hi, m0 + 1)
    return lo, hi


@triton.jit
def _q_free_range(
    doc_start_ptr, doc_end_ptr, n0, S, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr
):
    """Queries [lo, hi) that see *every* key of the block at n0: query blocks inside need no mask."""
    n_last = tl.minimum(n0 + BLOCK_N, S) - 1
    lo = 0
    hi = S
    if HAS_DOCS:
        ds0 = tl.load(doc_start_ptr + n0)
        ds1 = tl.load(doc_start_ptr + n_last)
        lo = tl.where(ds0 == ds1, ds0, S)
        hi = tl.load(doc_end_ptr + n0)
    if CAUSAL:
        lo = tl.maximum(lo, n0 + BLOCK_N - 1)
    return lo, hi


@triton.autotune(configs=_FWD_CONFIGS, key=_KEY)
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    DOC_ID,
    DOC_START,
    DOC_END,
    VISITS,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    svb,
    svh,
    svs,
    svd,
    sob,
    soh,
    sos,
    sod,
    H,
    S,
    D,
    qk_scale,
    S_BUCKET,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
    F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < D
    q_ptrs = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    doc_row = b.to(tl.int64) * S
    lo, hi = _kv_range(DOC_START + doc_row, DOC_END + doc_row, m0, S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOCS)
    free_lo, free_hi = _kv_free_range(DOC_START + doc_row, DOC_END + doc_row, m0, S, BLOCK_M, CAUSAL, HAS_DOCS)
    if HAS_DOCS:
        q_doc = tl.load(DOC_ID + doc_row + offs_m, mask=m_ok, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    visits = tl.full((), 0, tl.int32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < S
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], base-2 logits
        if (n0 < free_lo) | (n0 + BLOCK_N > free_hi):  # diagonal / document-boundary / tail block
            mask = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= offs_m[:, None])
            if HAS_DOCS:
                k_doc = tl.load(DOC_ID + doc_row + cols, mask=n_ok, other=-2)
                mask = mask & (k_doc[None, :] == q_doc[:, None])
            qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
        visits += 1
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sos + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # natural-log units
    tl.store(LSE + pid_bh.to(tl.int64) * S + offs_m, lse, mask=m_ok)
    if COUNT_VISITS:
        tl.store(VISITS + pid_bh * tl.num_programs(0) + pid_m, visits)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, sob, soh, sos, sod, sdb, sdh, sds, sdd, H, S, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    """delta[b, h, m] = sum_d o * do (fp32)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < S)[:, None] & (offs_d < D)[None, :]
    o = tl.load(
        O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sos + offs_d[None, :] * sod,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * S + offs_m, tl.sum(o * do, axis=1), mask=offs_m < S)


@triton.autotune(configs=_DKDV_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DOC_ID,
    DOC_START,
    DOC_END,
    VISITS,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    svb,
    svh,
    svs,
    svd,
    sdb,
    sdh,
    sds,
    sdd,
    H,
    HKV,
    S,
    D,
    qk_scale,
    sm_scale,
    S_BUCKET,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
    F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (batch, kv head, key block); loops over the GROUP query heads sharing it.

    dk/dv are written to contiguous [b, h_kv, s, d] buffers with the same strides as dq-less inputs.
    """
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < S
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(
        K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * sks + offs_d[None, :] * skd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh + offs_n[:, None] * svs + offs_d[None, :] * svd,
        mask=kv_mask,
        other=0.0,
    )
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    doc_row = b.to(tl.int64) * S
    lo, hi = _q_range(DOC_START + doc_row, DOC_END + doc_row, n0, S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOCS)
    free_lo, free_hi = _q_free_range(DOC_START + doc_row, DOC_END + doc_row, n0, S, BLOCK_N, CAUSAL, HAS_DOCS)
    if HAS_DOCS:
        k_doc = tl.load(DOC_ID + doc_row + offs_n, mask=n_ok, other=-2)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    visits = tl.full((), 0, tl.int32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        row_base = (b * H + h).to(tl.int64) * S
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + offs_m
            m_ok = rows < S
            q_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * sqs + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * sds + offs_d[None, :] * sdd, mask=q_mask, other=0.0)
            if F32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse2 = tl.load(LSE + row_base + rows, mask=m_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + rows, mask=m_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # [BN, BM]
            p_t = tl.exp2(s_t - lse2[None, :])  # [BN, BM]
            if (m0 < free_lo) | (m0 + BLOCK_M > free_hi):  # diagonal / document-boundary / tail block
                mask = n_ok[:, None] & m_ok[None, :]
                if CAUSAL:
                    mask = mask & (offs_n[:, None] <= rows[None, :])
                if HAS_DOCS:
                    q_doc = tl.load(DOC_ID + doc_row + rows, mask=m_ok, other=-1)
                    mask = mask & (k_doc[:, None] == q_doc[None, :])
                p_t = tl.where(mask, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # [BN, BM]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
            visits += 1
    dk = dk * sm_scale
    out_off = (b * HKV + hk).to(tl.int64) * S * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_mask)
    if COUNT_VISITS:
        tl.store(VISITS + pid_bk * tl.num_programs(0) + pid_n, visits)


@triton.autotune(configs=_DQ_CONFIGS, key=_KEY)
@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DOC_ID,
    DOC_START,
    DOC_END,
    sqb,
    sqh,
    sqs,
    sqd,
    skb,
    skh,
    sks,
    skd,
    svb,
    svh,
    svs,
    svd,
    sdb,
    sdh,
    sds,
    sdd,
    H,
    S,
    D,
    qk_scale,
    sm_scale,
    S_BUCKET,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DOCS: tl.constexpr,
    F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (batch, head, query block); dq written to a contiguous [b, h, s, d] buffer."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(
        Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqs + offs_d[None, :] * sqd,
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh + offs_m[:, None] * sds + offs_d[None, :] * sdd,
        mask=q_mask,
        other=0.0,
    )
    if F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_base = pid_bh.to(tl.int64) * S
    lse2 = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    doc_row = b.to(tl.int64) * S
    lo, hi = _kv_range(DOC_START + doc_row, DOC_END + doc_row, m0, S, BLOCK_M, BLOCK_N, CAUSAL, HAS_DOCS)
    free_lo, free_hi = _kv_free_range(DOC_START + doc_row, DOC_END + doc_row, m0, S, BLOCK_M, CAUSAL, HAS_DOCS)
    if HAS_DOCS:
        q_doc = tl.load(DOC_ID + doc_row + offs_m, mask=m_ok, other=-1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < S
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
        p = tl.exp2(s - lse2[:, None])
        if (n0 < free_lo) | (n0 + BLOCK_N > free_hi):  # diagonal / document-boundary / tail block
            mask = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                mask = mask & (cols[None, :] <= offs_m[:, None])
            if HAS_DOCS:
                k_doc = tl.load(DOC_ID + doc_row + cols, mask=n_ok, other=-2)
                mask = mask & (k_doc[None, :] == q_doc[:, None])
            p = tl.where(mask, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(
        DQ + pid_bh.to(tl.int64) * S * D + offs_m[:, None] * D + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )
