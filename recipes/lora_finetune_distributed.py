"""Multi-process LoRA fine-tuning with FSDP2, optional tensor parallelism and DCP checkpoints.

Same loop as ``full_finetune_distributed`` (see that file), with LoRA adapters on the
projections named by the LoRA keys of the ``model`` section (``lora_attn_modules``,
``apply_lora_to_mlp``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``, as in ``lora_finetune``); only the adapters are trained (the frozen
base is sharded by FSDP too). At the end rank 0 writes the PEFT adapter (``adapter/``) and
the merged model as HF safetensors (``hf_model/``).

Launch::

    tune run --nproc_per_node 2 lora_finetune_distributed --config smollm2/135M_lora_distributed
"""

from omegaconf import DictConfig

from recipes.full_finetune_distributed import run
from tinytune import config


def recipe_main(cfg: DictConfig) -> dict:
    """Distributed LoRA fine-tuning (FSDP2 / TP / DCP)."""
    return run(cfg, lora=True)


if __name__ == "__main__":
    config.parse(recipe_main)()
