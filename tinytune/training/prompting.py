"""Chat prompts for generation: template rendering -> token ids, decoding, stop handling.

:class:`SampleGenerations` is the training recipes' before/after comparison on
``sample_generation.prompts``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import torch
from torch import nn

from tinytune.datasets.templates import get_template
from tinytune.generation import generate
from tinytune.training.held_out import fraction_correct, parse_held_out


def get_bound_template(name: Any, tokenizer):
    """``get_template(name)`` bound to ``tokenizer`` (``hf`` uses the tokenizer's chat template)."""
    return get_template(name or "hf").bind(tokenizer)


def encode_chat_prompt(tokenizer, template, messages: list[dict], enable_thinking: bool | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant header (the model answers next).

    Args:
        tokenizer: tinytune tokenizer.
        template: a bound template (:func:`get_bound_template`).
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        enable_thinking: Qwen3 thinking switch: False writes the official non-thinking generation
            prompt (an empty ``<think>`` block); True/None let the model think.
    """
    segments = template.render(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    ids: list[int] = []
    text = ""  # consecutive text segments are encoded as one string, as the whole render would be
    for seg in segments:
        if seg.special is not None:
            ids.extend(tokenizer.encode(text, add_bos=False, add_eos=False) if text else [])
            text = ""
            tid = tokenizer.bos_id if seg.special == "bos" else tokenizer.eos_id
            if tid is not None:
                ids.append(int(tid))
        else:
            text += seg.text
    ids.extend(tokenizer.encode(text, add_bos=False, add_eos=False) if text else [])
    return ids


def stop_token_ids(tokenizer, template=None) -> list[int]:
    """EOS, the tokenizer's stop tokens and the template's end-of-turn strings that are single tokens."""
    ids = set(int(t) for t in (getattr(tokenizer, "stop_tokens", None) or []))
    if getattr(tokenizer, "eos_id", None) is not None:
        ids.add(int(tokenizer.eos_id))
    for s in getattr(template, "stop_strings", ()) or ():
        tid = tokenizer.token_to_id(s) if hasattr(tokenizer, "token_to_id") else None
        if tid is not None:
            ids.add(int(tid))
    return sorted(ids)


def prompt_messages(prompt: str | dict | Sequence[dict], system: str | None = None) -> list[dict]:
    """A prompt string (or message list) as a message list, with an optional system message."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, dict):
        msgs = [dict(prompt)]
    else:
        msgs = [dict(m) for m in prompt]
    if system and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": system}] + msgs
    return msgs


@torch.no_grad()
def generate_replies(
    model: nn.Module,
    tokenizer,
    template,
    prompts: Sequence[str | Sequence[dict]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    system: str | None = None,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    enable_thinking: bool | None = None,
) -> list[str]:
    """Answers each prompt through the chat template (batched, left-padded, KV cache).

    ``enable_thinking`` goes to the template's generation prompt (Qwen3: False = non-thinking mode).

    Returns:
        The decoded replies (special tokens skipped, surrounding whitespace stripped).
    """
    encoded = [encode_chat_prompt(tokenizer, template, prompt_messages(p, system), enable_thinking) for p in prompts]
    gen = None
    if seed is not None and temperature > 0:
        gen = torch.Generator(device=next(model.parameters()).device)
        gen.manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        out = generate(
            model,
            encoded,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_tokens=stop_token_ids(tokenizer, template),
            pad_id=int(getattr(tokenizer, "pad_id", None) or 0),
            generator=gen,
            on_token=on_token,
        )
    finally:
        model.train(was_training)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out]


def side_by_side(prompts: Sequence[str], before: Sequence[str], after: Sequence[str], width: int = 100) -> str:
    """A readable before/after comparison block for the terminal (one section per prompt)."""
    lines = ["=" * width, "Generation before vs after fine-tuning (same prompts, greedy)", "=" * width]
    for i, (p, b, a) in enumerate(zip(prompts, before, after), 1):
        p_text = p if isinstance(p, str) else p[-1]["content"]
        lines.append(f"[{i}] prompt: {p_text}")
        lines.append(f"    before: {' '.join(b.split())}")
        lines.append(f"    after : {' '.join(a.split())}")
        lines.append("-" * width)
    return "\n".join(lines)


class SampleGenerations:
    """Answers ``sample_generation.prompts`` before and after training and compares them.

    Settings: ``sample_generation.prompts`` and ``sample_generation.held_out`` (questions with
    expected answers, scored: :mod:`tinytune.training.held_out`; none of either: everything here
    is a no-op), ``sample_generation.max_new_tokens``, ``sample_generation.system``,
    ``sample_generation.enable_thinking`` and ``template``. Decoding is greedy.

    Args:
        sample: the ``sample_generation`` settings.
        template: the ``template`` setting (a template name).
        tokenizer: tinytune tokenizer.
    """

    def __init__(self, sample: Any, template: str, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.held_out = parse_held_out(sample.held_out)  # checked by the settings layer already
        self.prompts = list(sample.prompts) + [q.prompt for q in self.held_out]
        self.template = get_bound_template(template, tokenizer) if self.prompts else None
        # enable_thinking (Qwen3): true / false / null, as for the dataset
        self.gen_kw = dict(
            max_new_tokens=sample.max_new_tokens, system=sample.system, enable_thinking=sample.enable_thinking
        )
        self.before: list[str] = []

    def _answer(self, model: nn.Module) -> list[str]:
        return generate_replies(model, self.tokenizer, self.template, self.prompts, **self.gen_kw)

    def generate_before(self, model: nn.Module) -> None:
        """Answers the prompts with ``model`` as it is now (call before training)."""
        if self.prompts:
            self.before = self._answer(model)

    def generate_after(self, model: nn.Module, out_dir: str) -> dict[str, float]:
        """Answers again, prints both side by side and writes ``out_dir/generations.json``
        (``[{"prompt", "before", "after"}, ...]``, held-out items with ``correct_before/after``).

        Returns:
            ``{"held_out_correct_before", "held_out_correct_after"}`` (fractions) when there are
            held-out questions, else ``{}``: the recipes add it to their summary.
        """
        if not self.prompts:
            return {}
        after = self._answer(model)
        print(side_by_side(self.prompts, self.before, after))
        rows = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(self.prompts, self.before, after)]
        scores: dict[str, float] = {}
        if self.held_out:
            k = len(self.held_out)
            for q, row in zip(self.held_out, rows[-k:]):
                row.update(
                    expect=list(q.expect),
                    correct_before=q.is_correct(row["before"]),
                    correct_after=q.is_correct(row["after"]),
                )
            scores = {
                "held_out_correct_before": fraction_correct(self.held_out, self.before[-k:]),
                "held_out_correct_after": fraction_correct(self.held_out, after[-k:]),
            }
            print(
                f"held-out questions answered correctly: before {scores['held_out_correct_before']:.0%}, "
                f"after {scores['held_out_correct_after']:.0%} (of {k})"
            )
        with open(os.path.join(out_dir, "generations.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
        return scores
