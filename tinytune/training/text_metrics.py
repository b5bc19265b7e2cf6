"""Generation metrics against reference answers: exact match, ROUGE-L (F1) and corpus BLEU.

Small own implementations of the standard definitions, checked against ``rouge-score`` and
``sacrebleu`` in the tests: ROUGE-L as ``rouge_score.rouge_scorer`` (lower-cased alphanumeric
tokens, no stemming; LCS F-measure, averaged over examples) and BLEU as ``sacrebleu.corpus_bleu``
(13a tokenizer, 4-grams, one reference, ``exp`` smoothing, brevity penalty; 0-100).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

from torch import nn

from tinytune.generation import generate

_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")
_BLEU_RULES = (  # mteval-v13a punctuation rules (the 13a tokenizer)
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    _check(predictions, references)
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


def _rouge_tokens(text: str) -> list[str]:
    return [t for t in _ROUGE_SPLIT.split(text.lower()) if t]


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one prediction: LCS of the token lists over their lengths."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _bleu_tokens(text: str) -> list[str]:
    line = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _BLEU_RULES:
        line = pattern.sub(repl, line)
    return line.split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU (0-100) with one reference per prediction."""
    _check(predictions, references)
    correct, total = [0] * max_order, [0] * max_order
    sys_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        p, r = _bleu_tokens(pred), _bleu_tokens(ref)
        sys_len, ref_len = sys_len + len(p), ref_len + len(r)
        for n in range(1, max_order + 1):
            hyp, want = _ngrams(p, n), _ngrams(r, n)
            correct[n - 1] += sum(min(c, want[g]) for g, c in hyp.items())
            total[n - 1] += max(len(p) - n + 1, 0)
    if not any(correct):
        return 0.0
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len else 0.0)
    log_sum, smooth = 0.0, 1.0
    for n in range(max_order):
        if total[n] == 0:
            return 0.0  # no n-grams of this order at all: BLEU is 0
        if correct[n] == 0:
            smooth *= 2  # NIST "exp" smoothing
            precision = 100.0 / (smooth * total[n])
        else:
            precision = 100.0 * correct[n] / total[n]
        log_sum += math.log(precision)
    return bp * math.exp(log_sum / max_order)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "rouge_l", "bleu"}`` of predictions against references (ROUGE-L averaged)."""
    _check(predictions, references)
    rouge = sum(rouge_l(p, r) for p, r in zip(predictions, references)) / max(len(references), 1)
    return {
        "exact_match": exact_match(predictions, references),
        "rouge_l": rouge,
        "bleu": corpus_bleu(predictions, references),
    }


def prompt_and_reference(tokens: Sequence[int], labels: Sequence[int], ignore_index: int = -100):
    """Splits a (pre-shifted) dataset item at its last trained span: ``(prompt ids, reference ids)``.

    The prompt is every token before the first target of the last contiguous run of labels; the
    reference is that run's targets (the answer, end-of-turn included).
    """
    trained = [i for i, t in enumerate(labels) if t != ignore_index]
    if not trained:
        raise ValueError("item has no trained tokens")
    end = trained[-1]
    start = end
    while start - 1 >= 0 and labels[start - 1] != ignore_index:
        start -= 1
    return list(tokens[: start + 1]), [int(t) for t in labels[start : end + 1]]


def evaluate_generations(
    model: nn.Module, tokenizer, items: Sequence[dict], max_new_tokens: int, batch_size: int = 8
) -> dict:
    """Greedy answers to the prompts of dataset ``items`` scored against their reference answers
    (both decoded without special tokens, surrounding whitespace stripped).

    Returns:
        ``{"exact_match", "rouge_l", "bleu", "samples", "examples": [{"prediction", "reference"}, ...]}``.
    """
    pairs = [prompt_and_reference(it["tokens"], it["labels"]) for it in items]
    # stop where the references stop: the tokenizer's stop ids plus the special end-of-turn tokens the
    # references end with (e.g. <|im_end|>)
    specials = set((getattr(tokenizer, "special_tokens", None) or {}).values())
    stop = sorted(set(getattr(tokenizer, "stop_tokens", None) or []) | {r[-1] for _, r in pairs if r[-1] in specials})
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    was = model.training
    model.eval()
    preds: list[str] = []
    try:
        for i in range(0, len(pairs), batch_size):
            prompts = [p for p, _ in pairs[i : i + batch_size]]
            for out in generate(model, prompts, max_new_tokens, stop_tokens=stop, pad_id=pad):
                preds.append(tokenizer.decode(out, skip_special_tokens=True).strip())
    finally:
        model.train(was)
    refs = [tokenizer.decode([t for t in r if t not in stop], skip_special_tokens=True).strip() for _, r in pairs]
    out = generation_metrics(preds, refs)
    out["samples"] = len(pairs)
    out["examples"] = [{"prediction": p, "reference": r} for p, r in zip(preds, refs)]
    return out


def validation_generation_row(model: nn.Module, tokenizer, dataset, num_samples: int, max_new_tokens: int) -> dict:
    """``{"val_exact_match", "val_rouge_l", "val_bleu"}`` of greedy answers to the first ``num_samples``
    prompts of a validation dataset (:func:`evaluate_generations`)."""
    items = [dataset[i] for i in range(min(int(num_samples), len(dataset)))]
    if any("seq_lens" in it or "input_pos" in it for it in items):
        raise ValueError(
            "validation.generation: the validation data is packed; generation needs one "
            "conversation per item (set packed: false on the validation dataset)"
        )
    gen = evaluate_generations(model, tokenizer, items, max_new_tokens)
    return {f"val_{k}": gen[k] for k in ("exact_match", "rouge_l", "bleu")}
