"""Runs the distributed recipes with the SFT training-method keys (LoRA+, NEFTune, early stopping, DoRA, PiSSA).

Usage: methods_worker.py OUT_DIR CKPT_DIR SCENARIO...

Each scenario writes to OUT_DIR/<scenario>/. The base config is ``recipe_worker.base_cfg`` (4 AdamW
steps, global batch 4 in 2 micro-batches, fp32 on CPU); :data:`SCENARIOS` adds the keys under test.
The tests run the single-device recipe on the same config (:func:`scenario_cfg` with ``dp=1``).
"""

import os
import sys

from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch.distributed as dist  # noqa: E402

from tests.dist_workers.recipe_worker import base_cfg  # noqa: E402

# name -> (lora, tensor_parallel, keys set on top of base_cfg; "model" keys go beside the LoRA keys)
SCENARIOS = {
    "lora_loraplus": (True, 1, {"loraplus_lr_ratio": 8.0}),
    "lora_dora": (True, 1, {"model": {"use_dora": True}}),
    "lora_pissa": (True, 1, {"model": {"lora_init": "pissa", "use_rslora": True}}),
    "lora_dora_offload": (
        True,
        1,
        {"model": {"use_dora": True}, "fsdp": {"cpu_offload": True}, "activation_checkpointing": True},
    ),
    # + save_best: the kept best weights are this rank's tensor-parallel shards
    "lora_pissa_tp": (True, 2, {"model": {"lora_init": "pissa"}, "save_best": True}),
    # tensor + sequence parallel: the embedding output is a DTensor sharded on the sequence
    # (padding_free off: tensor parallelism keeps the collated [b, s], and the noise scale depends on s)
    "full_neftune_tp_sp": (
        False,
        2,
        {"neftune_noise_alpha": 5.0, "padding_free": False, "parallelism": {"sequence_parallel": True}},
    ),
    "lora_neftune_tp": (True, 2, {"neftune_noise_alpha": 5.0, "padding_free": False, "save_best": True}),
    # lr 0: only the noise moves the training loss; validation must see clean embeddings
    "lora_neftune_lr0": (True, 1, {"neftune_noise_alpha": 50.0, "optimizer": {"name": "adamw", "lr": 0.0}}),
    "full_neftune_lr0": (False, 1, {"neftune_noise_alpha": 50.0, "optimizer": {"name": "adamw", "lr": 0.0}}),
    # min_delta so large that only the first validation improves: patience 2 stops at step 3, best step 1
    "full_early_stop": (
        False,
        1,
        {
            "max_steps": 8,
            "validation": {"split_size": 7, "every_n_steps": 1, "batch_size": 3},
            "early_stopping": {"patience": 2, "min_delta": 1e9},
            "save_best": True,
        },
    ),
    # stopped after step 1 (a DCP checkpoint, the best step), resumed: stops at step 4 (patience 3) and exports
    # step 1 as an uninterrupted run does (the tracking comes from the checkpoint, the kept shards from the weights)
    "full_early_stop_resume": (
        False,
        1,
        {
            "_stop_first": 1,
            "max_steps": 8,
            "validation": {"split_size": 7, "every_n_steps": 1, "batch_size": 3},
            "early_stopping": {"patience": 3, "min_delta": 1e9},
            "save_best": True,
        },
    ),
    # the same with pipeline parallelism (2 stages; loader batches of 2 rows in 2 pipeline micro-batches)
    "full_early_stop_pp": (
        False,
        1,
        {
            "max_steps": 8,
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "parallelism": {"pipeline_parallel": 2, "microbatches": 2},
            "validation": {"split_size": 7, "every_n_steps": 1, "batch_size": 3},
            "early_stopping": {"patience": 2, "min_delta": 1e9},
            "save_best": True,
        },
    ),
    # save_best alone (no stopping); at this LR the validation loss rises after step 1, so the best step is not the last
    "lora_save_best": (
        True,
        1,
        {
            "max_steps": 5,
            "optimizer": {"name": "adamw", "lr": 2e-2},
            "validation": {"split_size": 7, "every_n_steps": 1, "batch_size": 3},
            "save_best": True,
        },
    ),
}


def scenario_cfg(name: str, out: str, ckpt: str, dp: int) -> dict:
    """The config of scenario ``name`` for ``dp`` data-parallel ranks (the single-device reference: ``dp=1``,
    without the distributed-only keys)."""
    lora, tp, extra = SCENARIOS[name]
    cfg = base_cfg(out, ckpt, dp, tp, lora)
    for key, value in extra.items():
        if key.startswith("_"):  # worker instructions, not config keys
            continue
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def main() -> None:
    from recipes.full_finetune_distributed import recipe_main as full_main
    from recipes.lora_finetune_distributed import recipe_main as lora_main
    from tinytune.distributed.mesh import init_distributed, shutdown_distributed

    out_root, ckpt = sys.argv[1], sys.argv[2]
    world = init_distributed("cpu").world_size
    for name in sys.argv[3:]:
        lora, tp, _ = SCENARIOS[name]
        cfg = scenario_cfg(name, os.path.join(out_root, name), ckpt, world // tp)
        run = lora_main if lora else full_main
        stop = SCENARIOS[name][2].get("_stop_first")
        if stop:  # a first run ends after `stop` steps with a DCP checkpoint; the second resumes from it
            run(OmegaConf.create(dict(cfg, stop_after_steps=stop, checkpoint_every_n_steps=0)))
        run(OmegaConf.create(cfg))
        dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
