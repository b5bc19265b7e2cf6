"""Runs the distributed recipes with pipeline parallelism for several scenarios in one process group.

Usage: pipeline_worker.py OUT_DIR CKPT_DIR SCENARIO...

A scenario name is ``<pp>x<dp>x<tp>-<schedule>[-lora][-ac][-resume]`` (e.g. ``2x1x1-1f1b``,
``2x2x1-gpipe-lora``); each writes OUT_DIR/<scenario>/. Every run: 4 optimizer steps on a global
batch of 4 samples, fp32 on CPU, validation at steps 2 and 4 (see :func:`pp_cfg`).
"""

import os
import sys

from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch.distributed as dist  # noqa: E402

from recipes.full_finetune_distributed import recipe_main as full_main  # noqa: E402
from recipes.lora_finetune_distributed import recipe_main as lora_main  # noqa: E402
from tests.dist_workers.recipe_worker import base_cfg  # noqa: E402
from tinytune.distributed.mesh import init_distributed, shutdown_distributed  # noqa: E402


def pp_cfg(out: str, ckpt: str, lora: bool, pp: int = 1, dp: int = 1, tp: int = 1, schedule: str = "1f1b") -> dict:
    """The recipe-test config (validation at steps 2 and 4); with ``pp > 1``: loader batches of 2 rows, each split into
    2 pipeline micro-batches (so with dp=1 an optimizer step runs two schedule steps)."""
    cfg = base_cfg(out, ckpt, dp=dp, tp=tp, lora=lora)
    if pp > 1:
        cfg.update(batch_size=2, gradient_accumulation_steps=2 // dp)
        cfg["parallelism"].update(pipeline_parallel=pp, pipeline_schedule=schedule, microbatches=2)
    return cfg


def main() -> None:
    out_root, ckpt = sys.argv[1], sys.argv[2]
    init_distributed("cpu")
    for scenario in sys.argv[3:]:
        layout, schedule, *flags = scenario.split("-")
        pp, dp, tp = (int(x) for x in layout.split("x"))
        lora = "lora" in flags
        cfg = pp_cfg(os.path.join(out_root, scenario), ckpt, lora, pp=pp, dp=dp, tp=tp, schedule=schedule)
        cfg["activation_checkpointing"] = "ac" in flags
        run = lora_main if lora else full_main
        if "resume" in flags:  # stop after 2 steps, then a second run resumes from DCP
            run(OmegaConf.create(dict(cfg, stop_after_steps=2, checkpoint_every_n_steps=0)))
        run(OmegaConf.create(cfg))
        dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
