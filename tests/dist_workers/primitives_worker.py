"""torchrun worker: checks the distributed helpers on a toy decoder against one process.

For each layout in argv (``fsdp``, ``tp``, ``hsdp``, ``fsdp_tp``, ``tp_lossparallel``) it trains
3 AdamW steps with 2 accumulation micro-steps from the same initial weights, once in plain
single-process PyTorch on the global batch and once sharded, and writes per-step losses, the
max parameter difference after training and after a DCP save/restore to ``$OUT/<layout>.json``.
"""

import contextlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from torch.distributed.tensor.parallel import loss_parallel  # noqa: E402

from tests.dist_workers.toy_decoder import ToyDecoder  # noqa: E402
from tinytune.checkpoint.dcp import DistributedCheckpointer  # noqa: E402
from tinytune.distributed.fsdp import (  # noqa: E402
    apply_fsdp,
    gather_full_state_dict,
    load_full_state_dict,
    materialize_meta_model,
    set_gradient_sync,
)
from tinytune.distributed.mesh import (  # noqa: E402
    ParallelDims,
    all_reduce_sum,
    build_device_mesh,
    get_dp_info,
    init_distributed,
    shutdown_distributed,
)
from tinytune.distributed.parallel_plans import apply_tp  # noqa: E402

STEPS, ACCUM, B, S, V = 3, 2, 4, 8, 64
LAYOUTS = {
    "fsdp": dict(data_parallel_shard=-1),
    "tp": dict(data_parallel_shard=1, tensor_parallel=-1),
    "tp_lossparallel": dict(data_parallel_shard=1, tensor_parallel=-1),
    "hsdp": dict(data_parallel_replicate=2, data_parallel_shard=-1),
    "fsdp_tp": dict(data_parallel_shard=-1, tensor_parallel=2),
}


def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS * ACCUM):
        tokens = torch.randint(0, V, (B, S), generator=g)
        labels = torch.randint(0, V, (B, S), generator=g)
        labels[torch.rand(B, S, generator=g) < 0.3] = -100
        out.append((tokens, labels))
    return out


def loss_sum(model, tokens, labels):
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


def reference(init_sd, data, tied):
    model = ToyDecoder(tied=tied)
    model.load_state_dict(init_sd)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(STEPS):
        window = data[step * ACCUM : (step + 1) * ACCUM]
        n = sum(int((lab != -100).sum()) for _, lab in window)
        total = 0.0
        for tokens, labels in window:
            loss = loss_sum(model, tokens, labels) / n
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model.state_dict()


def train_sharded(model, opt, mesh, data, steps, lp=False):
    dp_rank, dp_size = get_dp_info(mesh)
    losses = []
    for step in steps:
        window = data[step * ACCUM : (step + 1) * ACCUM]
        local = [(t[dp_rank::dp_size], l[dp_rank::dp_size]) for t, l in window]
        n = all_reduce_sum(torch.tensor(sum(int((l != -100).sum()) for _, l in local)), mesh.dp)
        total = torch.zeros(())
        for i, (tokens, labels) in enumerate(local):
            set_gradient_sync(model, i == ACCUM - 1)
            with loss_parallel() if lp else contextlib.nullcontext():  # backward too
                loss = loss_sum(model, tokens, labels) / n
                (loss * dp_size).backward()  # FSDP averages gradients over dp ranks
            total += loss.detach().full_tensor() if hasattr(loss, "full_tensor") else loss.detach()
        opt.step()
        opt.zero_grad()
        losses.append(all_reduce_sum(total, mesh.dp).item())
    return losses


def build(mesh, dims, full_sd, tied, lp):
    with torch.device("meta"):
        model = ToyDecoder(tied=tied)
    if dims.tp > 1:
        apply_tp(model, mesh.tp, loss_parallel=lp)
    apply_fsdp(model, mesh.fsdp)
    materialize_meta_model(model, torch.device("cpu"))
    load_full_state_dict(model, full_sd, broadcast_from_rank0=tied)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def max_diff(a, b):
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in b)


def main():
    out_dir = sys.argv[1]
    info = init_distributed("cpu")
    data = batches()
    for layout in sys.argv[2:]:
        tied = layout in ("tp_lossparallel", "hsdp")
        lp = layout == "tp_lossparallel"
        torch.manual_seed(0)
        init_sd = {k: v.clone() for k, v in ToyDecoder(tied=tied).state_dict().items()}
        ref_losses, ref_sd = reference(init_sd, data, tied)
        dims = ParallelDims.from_config(info.world_size, **LAYOUTS[layout])
        mesh = build_device_mesh(dims, "cpu")
        model, opt = build(mesh, dims, init_sd, tied, lp)
        losses = train_sharded(model, opt, mesh, data, range(2), lp)
        ckpt = DistributedCheckpointer(os.path.join(out_dir, layout), keep_last=1)
        ckpt.save(2, model, opt, {"step": 2})
        losses += train_sharded(model, opt, mesh, data, [2], lp)
        full = gather_full_state_dict(model)
        # resume: fresh model with different weights, restored from DCP, redo step 3
        model2, opt2 = build(mesh, dims, {k: torch.zeros_like(v) for k, v in init_sd.items()}, tied, lp)
        state = ckpt.load(ckpt.resolve("auto"), model2, opt2)
        resumed = train_sharded(model2, opt2, mesh, data, [state["step"]], lp)
        full2 = gather_full_state_dict(model2)
        if info.rank == 0:
            with open(os.path.join(out_dir, f"{layout}.json"), "w") as f:
                json.dump(
                    {
                        "ref": ref_losses,
                        "dist": losses,
                        "resumed": resumed,
                        "param_diff": max_diff(full, ref_sd),
                        "resumed_param_diff": max_diff(full2, ref_sd),
                        "keys_equal": sorted(full) == sorted(ref_sd),
                    },
                    f,
                )
        dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
