"""Model FLOPs of one tinytune training step, as tinytune computes it, and the machine's GEMM peak.

Counted (multiply-add = 2 FLOPs), for the micro-batch the recipe really runs (after the
padding-free flattening when it is on):

- every projection of every layer: forward ``2·T·in·out``; input gradient ``2·T·in·out`` except
  where nothing upstream needs it (layer 0 when the embedding is frozen, as in LoRA); weight
  gradient ``2·T·in·out`` only for trainable weights (none for a frozen LoRA base);
- LoRA adapters ``A [r, in]``, ``B [out, r]``: the same three terms on their two small GEMMs;
- attention per document of length ``n`` (causal, so half the square): forward ``QKᵀ`` and ``PV``
  ``2·2·h·d·n(n+1)/2``, backward up to twice that (``dP``, ``dV``, ``dQ``, ``dK``: those whose
  input carries a gradient);
- the output projection + CE only on labelled rows (the fused CE drops the others): forward and
  input gradient ``2·L·dim·vocab`` each, weight gradient when the output weight trains.

Elementwise work (norms, SwiGLU, RoPE, softmax, AdamW) is not counted: the limit is the GEMMs.
"""

from __future__ import annotations

import time


def step_flops(
    shape: dict, seq_lens: list[int], label_tokens: int, mode: str, rank: int, lora_targets: list[str]
) -> dict:
    """FLOPs of forward + backward for one micro-batch.

    Args:
        shape: ``dim, num_layers, num_heads, num_kv_heads, head_dim, hidden_dim, vocab_size``.
        seq_lens: lengths of the attention documents of the computed batch (all rows).
        label_tokens: positions with a label (rows the CE computes).
        mode: ``full`` or ``lora`` (LoRA: frozen base and embedding, output not adapted).
        rank: LoRA rank.
        lora_targets: adapted projections.

    Returns:
        ``{"linear": ..., "attention": ..., "ce": ..., "total": ...}`` in FLOPs.
    """
    d, hd, h, kv, f = shape["dim"], shape["head_dim"], shape["num_heads"], shape["num_kv_heads"], shape["hidden_dim"]
    tokens = sum(seq_lens)
    projections = {
        "q_proj": (d, h * hd),
        "k_proj": (d, kv * hd),
        "v_proj": (d, kv * hd),
        "o_proj": (h * hd, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    full = mode == "full"
    linear = 0
    for layer in range(shape["num_layers"]):
        for name, (i, o) in projections.items():
            gemm = 2 * tokens * i * o
            first_input = layer == 0 and name in ("q_proj", "k_proj", "v_proj")
            linear += gemm  # forward
            if full or not first_input:
                linear += gemm  # input gradient
            if full:
                linear += gemm  # weight gradient
            elif name in lora_targets:
                adapter = 2 * tokens * (i * rank + rank * o)
                linear += 2 * adapter  # adapter forward and weight gradients
                linear += 2 * tokens * rank * o  # gradient into A's output (through B)
                if not first_input:
                    linear += 2 * tokens * i * rank  # gradient into the layer input (through A)
    causal_pairs = sum(n * (n + 1) // 2 for n in seq_lens)
    one_gemm = 2 * h * hd * causal_pairs  # one of QKᵀ, PV, dP, dV, dQ, dK over all documents
    attention = 0
    for layer in range(shape["num_layers"]):
        # which of q, k, v carry a gradient: all of them, except in layer 0 over a frozen embedding,
        # where only the adapted projections' outputs do
        q, k, v = (full or layer > 0 or f"{n}_proj" in lora_targets for n in ("q", "k", "v"))
        attention += 2 * one_gemm  # forward: QKᵀ, PV
        attention += one_gemm * ((q or k) + v + q + k)  # backward: dP, dV, dQ, dK
    ce_gemm = 2 * label_tokens * d * shape["vocab_size"]
    ce = ce_gemm * (3 if full else 2)
    return {"linear": linear, "attention": attention, "ce": ce, "total": linear + attention + ce}


def gemm_peak_flops(torch, dtype, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square GEMM (best of ``repeats``): the machine's matmul limit at the
    current thread count and dtype, measured in the calling process.

    On the CPU every GEMM library the process can reach is tried (``torch.mm``; for fp32 also
    oneDNN's matmul in one pass over ``k``, ``cpu_gemm: onednn_fast``) and the fastest counts: the limit is the hardware's, not
    that of whichever library a run happens to use (on AMD CPUs MKL's fp32 GEMM is about half of
    oneDNN's)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    candidates = [lambda: torch.mm(a, b)]
    if dtype == torch.float32:
        from tinytune.kernels import cpu_gemm

        if cpu_gemm.onednn_available():
            candidates.append(lambda: cpu_gemm.one_pass(a, b.t()))
    best = float("inf")
    for fn in candidates:
        fn()  # warm-up: thread pool, packing buffers
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
