"""Generate answers to prompts through the model's chat template.

Prompts come from ``prompt`` (one string), ``prompts`` (a list) or ``prompt_file`` (a text file
with one prompt per line, or JSONL with a ``prompt`` or ``messages`` field per line).

    tune run generate --config smollm2/generate prompt="What is the capital of France?"
    tune run generate --config smollm2/generate prompt_file=prompts.txt temperature=0.7 top_p=0.9
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from omegaconf import DictConfig

import tinytune.config
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import GenerateSettings
from tinytune.generation import decode_layout, use_decode_plan
from tinytune.training import load_model_and_tokenizer, setup_device
from tinytune.training.prompting import generate_replies, get_bound_template


def read_prompts(s: GenerateSettings) -> list:
    """Prompts from ``prompt``, ``prompts`` and ``prompt_file`` (in that order).

    Raises:
        ConfigError: no prompt given, or a prompt file line that cannot be used (file and line named).
    """
    prompts: list = []
    if s.prompt:
        prompts.append(s.prompt)
    prompts += list(s.prompts)
    path = s.prompt_file
    if path:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise ConfigError(f"prompt_file: {path} not found")
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.endswith(".jsonl"):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{i}: not valid JSON ({e})") from None
                    if "messages" in row:
                        prompts.append(row["messages"])
                    elif "prompt" in row:
                        prompts.append(str(row["prompt"]))
                    else:
                        raise ConfigError(f"{path}:{i}: a JSONL prompt needs a 'prompt' or 'messages' field")
                else:
                    prompts.append(line)
    if not prompts:
        raise ConfigError('no prompts: set prompt="...", prompts=[...] or prompt_file=PATH')
    return prompts


def recipe_main(cfg: DictConfig) -> list[str]:
    """Answers every prompt; prints prompt and reply; returns the replies."""
    s = GenerateSettings.from_config(cfg)  # every key checked before the model loads
    device, dtype, seed = setup_device(s.hardware, training=False)
    _, tokenizer, model, _ = load_model_and_tokenizer(s, device, dtype)
    model.eval()
    template = get_bound_template(s.source.template, tokenizer)
    prompts = read_prompts(s)
    plan = use_decode_plan(s.decode_plan, len(prompts) * s.max_new_tokens)
    print(f"decode plan: {'on' if plan else 'off'} (decode_plan: {s.decode_plan})")
    t0 = time.perf_counter()
    # decode_layout: fused decode-time weights and a lean decode step (CPU); the model is unchanged after
    with decode_layout(model) if plan else contextlib.nullcontext():
        replies = generate_replies(
            model,
            tokenizer,
            template,
            prompts,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            system=s.system,
            seed=seed,
            enable_thinking=s.enable_thinking,
        )
    dt = time.perf_counter() - t0
    for p, r in zip(prompts, replies):
        shown = p if isinstance(p, str) else p[-1]["content"]
        print(f">>> {shown}\n{r}\n")
    print(f"[{len(prompts)} prompt(s) in {dt:.1f}s]")
    out = s.output_file
    if out:
        with open(os.path.expanduser(str(out)), "w", encoding="utf-8") as f:
            for p, r in zip(prompts, replies):
                f.write(json.dumps({"prompt": p, "reply": r}) + "\n")
    return replies


if __name__ == "__main__":
    tinytune.config.parse(recipe_main)()
