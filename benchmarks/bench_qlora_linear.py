"""One QLoRA projection, forward + backward: tinytune's fused NF4 path vs the unfused composition.

"fused" is ``LoRALinear(quantize_base=True)`` as the recipes run it (NF4 dequantized by
``dequantize_nf4`` into a scratch buffer in forward and again in backward, base GEMM and adapter in
one autograd Function). "unfused" is what it replaced: torchao's ``linear_nf4`` for the base plus
the adapter as eager modules. Both run on the same module and input in the same process, rounds
interleaved; CPU time (user+sys) per call, median. Also one dequantization pass over the 210
projections of SmolLM2-135M with torchao's ``get_original_weight`` vs ``dequantize_nf4``.

    python benchmarks/bench_qlora_linear.py               # SmolLM2-135M shapes, 1,555 rows, one thread
    python benchmarks/bench_qlora_linear.py --smoke       # tiny shapes (used by the tests)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_line, median, print_table  # noqa: E402

SMOLLM2_PROJECTIONS = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1555, help="tokens per call (1,555: bench_train's label rows)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    shapes, layers = SMOLLM2_PROJECTIONS, 30
    if args.smoke:
        shapes, layers, args.rows, args.rounds = [(64, 128), (128, 64)], 2, 16, 1

    import torch

    from tinytune.modules.peft import LoRALinear
    from tinytune.modules.peft.nf4 import dequantize_nf4, linear_nf4  # linear_nf4: torchao's, unchanged

    torch.set_num_threads(args.threads)

    def unfused(m, x):
        return linear_nf4(x, m.weight) + m.scaling * m.lora_b(m.lora_a(x))

    rows = []
    for in_dim, out_dim in dict.fromkeys(shapes):
        torch.manual_seed(0)
        m = LoRALinear(in_dim, out_dim, rank=args.rank, alpha=2.0 * args.rank, quantize_base=True)
        torch.nn.init.normal_(m.lora_b.weight, std=0.02)
        x = torch.randn(args.rows, in_dim, requires_grad=True)
        cpu = {"fused": [], "unfused": []}
        for _ in range(args.rounds + 1):  # the first round warms up
            for name, fn in (("fused", m), ("unfused", lambda t, m=m: unfused(m, t))):
                c0 = time.process_time()
                fn(x).sum().backward()
                cpu[name].append(time.process_time() - c0)
                x.grad = None
                m.zero_grad(set_to_none=True)
        f, u = (1000 * median(cpu[k][1:] or cpu[k]) for k in ("fused", "unfused"))
        rows.append([f"{in_dim} -> {out_dim}", f"{f:.1f}", f"{u:.1f}", f"{u / f:.2f}x"])

    weights = [LoRALinear(i, o, rank=1, alpha=1.0, quantize_base=True).weight for i, o in shapes]

    def one_pass(fn) -> float:
        c0 = time.process_time()
        for _ in range(layers):
            for w in weights:
                fn(w)
        return time.process_time() - c0

    passes = {"torchao": [], "tinytune": []}
    for _ in range(max(args.rounds // 2, 1)):
        passes["torchao"].append(one_pass(lambda w: w.get_original_weight()))
        passes["tinytune"].append(one_pass(lambda w: dequantize_nf4(w, reuse=True)))

    print(machine_line())
    print(
        f"fp32, {args.rows} rows, LoRA rank {args.rank}, {args.rounds} rounds (median), torch threads "
        f"{torch.get_num_threads()}; CPU ms per forward + backward of one projection"
    )
    print_table(["projection (in -> out)", "fused CPU ms", "unfused CPU ms", "unfused/fused"], rows)
    ta, tt = median(passes["torchao"]), median(passes["tinytune"])
    print(
        f"one NF4 dequantization pass over {layers} x {len(shapes)} projections: torchao {ta:.3f} CPU-s, "
        f"dequantize_nf4 {tt:.3f} CPU-s ({ta / tt:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
