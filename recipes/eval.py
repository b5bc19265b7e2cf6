"""Validation loss and perplexity of a model on a held-out split or a data file.

The data is ``dataset`` (a dataset node, e.g. a file through ``tinytune.datasets.chat_dataset``);
with ``validation.split_ratio`` / ``validation.split_size`` only the held-out part is evaluated,
the same samples a fine-tuning run with the same ``seed`` and split held out. With
``generation.num_samples: N`` the model also answers the prompts of the first N samples (greedy,
``generation.max_new_tokens``) and the answers are scored against the references: exact match,
ROUGE-L and BLEU (:mod:`tinytune.training.text_metrics`).

    tune run eval --config smollm2/eval checkpoint_dir=outputs/demo/hf_model
"""

from __future__ import annotations

import json
import os
import time

from omegaconf import DictConfig

import tinytune.config
from tinytune.config.recipe_settings import EvalSettings
from tinytune.training import (
    build_collate,
    evaluate_generations,
    evaluate_loss,
    load_model_and_tokenizer,
    setup_device,
    train_val_datasets,
    validation_batches,
)


def recipe_main(cfg: DictConfig) -> dict:
    """Evaluates; prints and returns ``{"loss", "perplexity", "tokens", "samples"}``."""
    s = EvalSettings.from_config(cfg)  # every key checked before the model loads
    device, dtype, _ = setup_device(s.hardware, training=False)
    checkpoint_dir, tokenizer, model, _ = load_model_and_tokenizer(s, device, dtype)
    train_ds, val_ds = train_val_datasets(s, tokenizer, s.hardware.seed)
    data = val_ds if val_ds is not None else train_ds  # no split configured: the whole dataset
    loader = validation_batches(data, s.batch_size, build_collate(s.pad_to_multiple_of, tokenizer, data))
    t0 = time.perf_counter()
    # padding-free: same loss; skips what follows the last label
    result = evaluate_loss(model, loader, device, s.max_batches, s.padding_free)
    result.update(samples=len(data), seconds=round(time.perf_counter() - t0, 2), checkpoint_dir=checkpoint_dir)
    print(
        f"eval: loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
        f"{result['tokens']} label tokens in {result['samples']} samples"
    )
    n_gen = s.generation.num_samples
    if n_gen > 0:
        items = [data[i] for i in range(min(n_gen, len(data)))]
        gen = evaluate_generations(model, tokenizer, items, s.generation.max_new_tokens)
        result["generation"] = gen
        print(
            f"eval: generation on {gen['samples']} samples: exact match {gen['exact_match']:.3f} | "
            f"ROUGE-L {gen['rouge_l']:.3f} | BLEU {gen['bleu']:.2f}"
        )
    out_dir = s.output_dir
    if out_dir:
        os.makedirs(os.path.expanduser(str(out_dir)), exist_ok=True)
        with open(os.path.join(os.path.expanduser(str(out_dir)), "eval.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
