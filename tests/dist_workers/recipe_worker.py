"""Runs the distributed recipes in one process group for several scenarios (torchrun or plain python).

Usage: recipe_worker.py OUT_DIR CKPT_DIR SCENARIO...

Each scenario writes to OUT_DIR/<scenario>/ (metrics.jsonl, hf_model/, adapter/, dcp/). All
runs train 4 optimizer steps on a global batch of 4 samples (2 micro-batches per step, split
over the data-parallel ranks) with fp32 on CPU, and validate at steps 2 and 4.
"""

import os
import sys

from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch.distributed as dist  # noqa: E402

from recipes.full_finetune_distributed import recipe_main as full_main  # noqa: E402
from recipes.lora_finetune_distributed import recipe_main as lora_main  # noqa: E402
from tinytune.distributed.mesh import init_distributed, shutdown_distributed  # noqa: E402

LORA = {
    "lora_attn_modules": ["q_proj", "v_proj", "o_proj"],
    "apply_lora_to_mlp": True,
    "lora_rank": 4,
    "lora_alpha": 8.0,
    "lora_dropout": 0.0,
}


def base_cfg(out: str, ckpt: str, dp: int, tp: int, lora: bool) -> dict:
    global_batch = 4
    cfg = {
        "output_dir": out,
        "seed": 7,
        "device": "cpu",
        "dtype": "fp32",
        "checkpoint_dir": ckpt,
        "plot_loss": False,
        "dataset": {"_component_": "tests.dist_workers.data.random_sft", "n": 48},
        "batch_size": global_batch // dp // 2,
        "gradient_accumulation_steps": 2,
        "epochs": 1,
        "max_steps": 4,
        "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "lr_scheduler": {"name": "cosine", "warmup_steps": 1},
        "clip_grad_norm": 1.0,
        "checkpoint_every_n_steps": 2,
        "keep_last_checkpoints": 1,
        "resume_from_checkpoint": "auto",
        "metric_loggers": ["jsonl"],
        # 7 held-out samples in batches of 3: one rank runs a masked filler batch in the last round
        "validation": {"split_size": 7, "every_n_steps": 2, "batch_size": 3},
        "parallelism": {"data_parallel_shard": -1, "tensor_parallel": tp, "loss_parallel": False},
        "fsdp": {"reshard_after_forward": True, "cpu_offload": False},
    }
    if lora:
        cfg["model"] = dict(LORA)
    return cfg


def main() -> None:
    out_root, ckpt = sys.argv[1], sys.argv[2]
    device = "cuda" if any(sc.startswith("cuda") for sc in sys.argv[3:]) else "cpu"
    info = init_distributed(device)
    world = info.world_size
    for scenario in sys.argv[3:]:
        lora = scenario.startswith("lora")
        tp = 2 if "tp" in scenario else 1
        dp = world // tp
        out = os.path.join(out_root, scenario)
        cfg = base_cfg(out, ckpt, dp, tp, lora)
        cfg["parallelism"]["loss_parallel"] = "lossparallel" in scenario
        cfg["parallelism"]["sequence_parallel"] = "_sp" in scenario
        cfg["activation_checkpointing"] = "_ac" in scenario
        cfg["fsdp"]["cpu_offload"] = "_offload" in scenario
        if "_epochs" in scenario:  # 16 training samples: 4 steps per epoch, 2 epochs, stop at the epoch boundary
            cfg.update(max_steps=0, epochs=2, dataset=dict(cfg["dataset"], n=23))
        if scenario.startswith("cuda"):  # nccl, bf16 compute with fp32 master weights, Triton kernels
            cfg.update(device="cuda", dtype="bf16")
        if scenario.endswith("resume"):  # stop after 2 steps, then a second run resumes from DCP
            stop = 4 if "_epochs" in scenario else 2
            run = lora_main if lora else full_main
            run(OmegaConf.create(dict(cfg, stop_after_steps=stop, checkpoint_every_n_steps=0)))
        (lora_main if lora else full_main)(OmegaConf.create(cfg))
        dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
