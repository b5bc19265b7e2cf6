"""Autoregressive generation: greedy or sampled, batched with left padding, optional KV cache.

Left padding: prompts are right-aligned in a ``[b, L]`` buffer. Every row's real tokens get
positions ``0, 1, ...`` (pad positions are never attended to), so a left-padded row produces the
same tokens as the prompt run alone.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from tinytune.modules.decode_plan import DecodePlan

# id(model) -> its DecodePlan while a decode_layout block is open (removed when the block ends)
_PLANS: dict[int, DecodePlan] = {}


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token of each row.

    Args:
        logits: ``[b, vocab]`` scores of the last position.
        temperature: ``<= 0`` means greedy (argmax); otherwise logits are divided by it.
        top_k: keep only the ``top_k`` highest-scoring tokens before sampling.
        top_p: keep the smallest set of tokens whose probability mass reaches ``top_p``.
        generator: random generator for reproducible sampling.

    Returns:
        ``[b]`` int64 token ids.
    """
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)  # [b]
    scores = logits.float() / temperature  # [b, V]
    if top_k is not None and top_k > 0:
        k = min(int(top_k), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # [b, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)  # [b, V] each
        probs = sorted_scores.softmax(dim=-1)  # [b, V]
        mass_before = probs.cumsum(dim=-1) - probs  # [b, V] mass of strictly better tokens
        drop_sorted = mass_before >= top_p  # the best token is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [b, V]
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)  # [b, V]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # [b]


def _validate_prompts(prompt_tokens: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompt_tokens:
        raise ValueError("generate: prompt_tokens is empty; pass a list of token-id lists")
    for i, prompt in enumerate(prompt_tokens):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


#: ``decode_plan: auto`` turns the plan on from this many tokens to generate (prompts x max_new_tokens
#: in ``generate``, max_new_tokens per reply in ``chat``): below it the plan's one-time set-up
#: (~1.7 s for SmolLM2-135M on the 2-core CPU) is not paid back.
DECODE_PLAN_MIN_TOKENS = 256


def use_decode_plan(setting: bool | str, tokens: int) -> bool:
    """Whether to decode inside :func:`decode_layout`: ``decode_plan`` true / false, or ``auto`` =
    ``tokens >= DECODE_PLAN_MIN_TOKENS``."""
    return setting is True or (setting == "auto" and tokens >= DECODE_PLAN_MIN_TOKENS)


@contextlib.contextmanager
def decode_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Decode-time weight layout for a series of :func:`generate` calls on CPU; the model is unchanged after.

    For a :class:`~tinytune.modules.TransformerDecoder` on CPU this builds a
    :class:`~tinytune.modules.decode_plan.DecodePlan`: copies of the projection weights with q/k/v and
    gate/up fused, stored column-major (``W^T`` contiguous, the faster operand for MKL's small-M
    GEMM), LoRA adapters merged, packed for MKL's GEMM on the first fp32 step of each batch size >
    1; :func:`generate` runs its KV-cache steps through the plan's lean one-position step. The
    model's own parameters are only read (a change to them inside the block rebuilds the plan).
    Outputs agree with the module path to fp32 rounding. Building the plan costs about one copy
    of the weights (a second for packing), held until the block ends, so wrap a whole series of
    :func:`generate` calls (a prompt file, an evaluation, a chat session), not a single short one.

    Models the plan does not cover (NF4 bases, DTensors, GPU weights, other module types) get the
    older layout change instead: their plain 2-D floating CPU parameters are stored column-major
    in place (same values and parameter objects; only ``.data``'s strides change) and restored on
    exit. Do not train inside the block.

    Args:
        model: any module.

    Yields:
        ``model``.
    """
    if id(model) in _PLANS:  # nested block: the outer one owns the plan
        yield model
        return
    plan = DecodePlan.build(model)
    if plan is not None:
        _PLANS[id(model)] = plan
        try:
            yield model
        finally:
            del _PLANS[id(model)]
        return
    moved: list[nn.Parameter] = []
    try:
        for p in model.parameters():
            if type(p) is nn.Parameter and p.dim() == 2 and p.is_floating_point() and p.device.type == "cpu":
                if p.is_contiguous() and min(p.shape) > 1:
                    p.data = p.data.t().contiguous().t()  # same [out, in] values, column-major storage
                    moved.append(p)
        yield model
    finally:
        for p in moved:
            p.data = p.data.contiguous()


def _active_plan(model: nn.Module) -> DecodePlan | None:
    """The model's decode plan inside :func:`decode_layout` (rebuilt if its weights changed), else ``None``."""
    plan = _PLANS.get(id(model))
    if plan is None or plan.model is not model:
        return None
    fresh = plan.current()
    if fresh is not plan and fresh is not None:
        _PLANS[id(model)] = fresh
    return fresh


def _prefix_mask(valid: torch.Tensor, length: int) -> torch.Tensor:
    """``[b, length, length]`` boolean mask: causal over real tokens; a pad position sees only itself.

    Args:
        valid: ``[b, T]`` True at real (non-pad) positions, ``T >= length``.
        length: how many leading positions the mask covers.
    """
    valid = valid[:, :length]  # [b, L]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril_()  # [L, L]
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)  # [L, L] pads attend to themselves
    return (causal[None] & valid[:, None, :]) | eye[None]  # [b, L, L]


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompt_tokens: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_id: int = 0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Generate continuations for a batch of prompts.

    Args:
        model: a :class:`~tinytune.modules.TransformerDecoder` (any module with the same
            ``forward(tokens, input_pos, mask=...)`` and ``setup_caches`` API).
        prompt_tokens: one list of token ids per prompt (lengths may differ).
        max_new_tokens: most tokens to generate per prompt.
        temperature: ``0`` = greedy; ``> 0`` = sampling.
        top_k: optional top-k filter for sampling.
        top_p: optional nucleus filter for sampling.
        stop_tokens: ids that end a row (not included in the output).
        pad_id: id used for left padding (never attended to).
        use_cache: decode with a KV cache (otherwise recompute the whole prefix each step).
        generator: random generator for sampling.
        on_token: streaming callback ``on_token(row, token_id)``, called for every emitted token.

    Returns:
        One list of generated token ids per prompt (prompt and stop token excluded).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab_size = model.tok_embeddings.num_embeddings
    _validate_prompts(prompt_tokens, vocab_size)
    stop = torch.tensor(sorted(set(int(t) for t in (stop_tokens or []))), dtype=torch.long)
    device = model.tok_embeddings.weight.device
    stop = stop.to(device)
    b = len(prompt_tokens)
    prompt_len = max(len(p) for p in prompt_tokens)
    total = prompt_len + max_new_tokens

    tokens = torch.full((b, total), pad_id, dtype=torch.long, device=device)  # [b, T]
    valid = torch.ones(b, total, dtype=torch.bool, device=device)  # [b, T]
    for i, prompt in enumerate(prompt_tokens):
        pad = prompt_len - len(prompt)
        tokens[i, pad:prompt_len] = torch.tensor([int(t) for t in prompt], dtype=torch.long)
        valid[i, :pad] = False
    input_pos = (valid.long().cumsum(-1) - 1).clamp_(min=0)  # [b, T] real tokens start at 0

    outputs: list[list[int]] = [[] for _ in range(b)]
    if max_new_tokens == 0:
        return outputs
    done = torch.zeros(b, dtype=torch.bool, device=device)  # [b]

    owns_cache = False
    if use_cache:
        if model.caches_are_enabled():
            cache = model.layers[0].attn.kv_cache
            if cache.batch_size != b or cache.max_seq_len < total:
                raise ValueError(
                    f"generate: the model's KV caches hold batch {cache.batch_size} x {cache.max_seq_len} positions "
                    f"but this call needs {b} x {total}; call model.clear_caches() or set them up again"
                )
            model.reset_caches()
        else:
            model.setup_caches(b, total)
            owns_cache = True
    elif model.caches_are_enabled():
        raise ValueError("generate: use_cache=False but the model has KV caches attached; call model.clear_caches()")

    plan = _active_plan(model) if use_cache else None  # inside decode_layout: the lean decode step
    try:
        cur = prompt_len
        if use_cache:  # prefill: the vocabulary projection only for the last position
            hidden = model(tokens[:, :cur], input_pos[:, :cur], mask=_prefix_mask(valid, cur), return_hidden=True)
            if plan is not None:
                plan.prepare(b, total)
            logits = (model.output if plan is None else plan.logits)(hidden[:, -1])  # [b, V]
            # one decode step's mask is a row of this, a view: new token -> every real token so far
            # (all earlier slots: causal by construction); 0 = attend, -inf = left padding
            key_bias = torch.zeros(b, 1, total, dtype=hidden.dtype, device=device)  # [b, 1, T]
            key_bias.masked_fill_(~valid[:, None], float("-inf"))
            # the plan's step: no mask at all when no row is padded (every cached slot is attended)
            step_bias = key_bias[:, None] if bool((~valid).any()) else None  # [b, 1, 1, T]
        else:
            full_mask = _prefix_mask(valid, total)  # [b, T, T]
        for step in range(max_new_tokens):
            if not use_cache:
                logits = model(tokens[:, :cur], input_pos[:, :cur], mask=full_mask[:, :cur, :cur])[:, -1]  # [b, V]
            nxt = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            nxt.masked_fill_(done, pad_id)  # [b]
            is_stop = torch.isin(nxt, stop) & ~done if len(stop) else torch.zeros_like(done)  # [b]
            for i, (tok, skip) in enumerate(zip(nxt.tolist(), (done | is_stop).tolist())):
                if skip:
                    continue
                outputs[i].append(tok)
                if on_token is not None:
                    on_token(i, tok)
            done |= is_stop
            tokens[:, cur] = nxt
            cur += 1
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if plan is not None:  # one position in, its logits out; the KV caches grow in place
                logits = plan.step(
                    tokens[:, cur - 1], input_pos[:, cur - 1], None if step_bias is None else step_bias[..., :cur]
                )
            elif use_cache:
                logits = model(tokens[:, cur - 1 : cur], input_pos[:, cur - 1 : cur], mask=key_bias[:, :, :cur])[:, -1]
    finally:
        if owns_cache:
            model.clear_caches()
    return outputs
