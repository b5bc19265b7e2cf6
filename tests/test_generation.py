"""Generation: cache vs no cache, left padding vs one-by-one, sampling filters, stops, HF greedy."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tinytune.generation import generate, sample_next_token  # noqa: E402
from tinytune.models import llama3, qwen2, qwen3, smollm2  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42, 7], [11, 2], [200, 13, 14, 15], [9]]


def _model(builder=llama3.llama3_tiny, seed=0):
    torch.manual_seed(seed)
    model = builder().eval()
    with torch.no_grad():  # larger weights than the training init: peaked, varied predictions
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model


@pytest.mark.parametrize(
    "builder", [llama3.llama3_tiny, qwen2.qwen2_tiny, qwen3.qwen3_tiny, smollm2.smollm2_tiny], ids=lambda b: b.__name__
)
def test_cache_equals_no_cache_and_padding_equals_alone(builder):
    model = _model(builder)
    cached = generate(model, PROMPTS, max_new_tokens=10, pad_id=0)
    uncached = generate(model, PROMPTS, max_new_tokens=10, pad_id=0, use_cache=False)
    assert cached == uncached
    assert not model.caches_are_enabled()
    alone = [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]
    assert cached == alone
    assert all(len(out) == 10 for out in cached)
    assert len({t for out in cached for t in out}) > 5  # not a degenerate repetition


def test_pad_id_value_does_not_matter():
    model = _model()
    assert generate(model, PROMPTS, 6, pad_id=0) == generate(model, PROMPTS, 6, pad_id=123)


def test_greedy_matches_hf_generate():
    transformers = pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_model_parity import _pair

    hf, ours = _pair("llama3")
    prompt = [5, 17, 99, 3, 42, 7]
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0, eos_token_id=None
    )[0, len(prompt) :].tolist()
    assert generate(ours, [prompt], max_new_tokens=12) == [ref]
    del transformers


def test_stop_tokens_and_streaming():
    model = _model()
    full = generate(model, PROMPTS, max_new_tokens=8)
    stop = full[0][3]
    streamed: list[tuple[int, int]] = []
    out = generate(model, PROMPTS, max_new_tokens=8, stop_tokens=[stop], on_token=lambda r, t: streamed.append((r, t)))
    for got, ref in zip(out, full):
        expected = ref[: ref.index(stop)] if stop in ref else ref
        assert got == expected
    assert sorted(streamed) == sorted((r, t) for r, toks in enumerate(out) for t in toks)


def test_sampling_is_seeded_and_cache_independent():
    model = _model()
    kw = dict(max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.9)
    a = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, PROMPTS, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    c = generate(model, PROMPTS, generator=torch.Generator().manual_seed(8), **kw)
    assert a == b
    assert a != c
    assert generate(model, PROMPTS, 8, temperature=1.0, top_k=1) == generate(model, PROMPTS, 8)


def test_sample_next_token_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, temperature=1.0, top_k=2, generator=g).tolist()) == {1, 2}
    # top_p=0.5: token 1 alone has ~0.44 of the mass, tokens 1+2 reach ~0.84 -> keep exactly {1, 2}
    assert set(sample_next_token(logits, temperature=1.0, top_p=0.5, generator=g).tolist()) == {1, 2}
    assert set(sample_next_token(logits, temperature=1.0, top_p=0.3, generator=g).tolist()) == {1}
    assert sample_next_token(logits[:1]).tolist() == [1]


def test_bad_prompts_raise():
    model = _model()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 10_000]], 3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_forward_and_generation(monkeypatch, dtype):
    """On CUDA the forward goes through the Triton kernel; compare with SDPA and generate there."""
    model = _model(qwen3.qwen3_tiny).to("cuda", dtype)
    tokens = torch.randint(0, 512, (2, 64), device="cuda")
    seq_lens = torch.tensor([[20, 44], [64, 0]], device="cuda")
    pos = torch.cat([torch.cat([torch.arange(20), torch.arange(44)])[None], torch.arange(64)[None]]).cuda()
    with torch.no_grad():
        got = model(tokens, input_pos=pos, seq_lens=seq_lens).float()
        monkeypatch.setenv("TINYTUNE_ATTENTION", "sdpa")
        ref = model(tokens, input_pos=pos, seq_lens=seq_lens).float()
    tol = 1e-3 if dtype == torch.float32 else 5e-2 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol
    if dtype == torch.float32:
        assert generate(model, PROMPTS, 8) == generate(model, PROMPTS, 8, use_cache=False)


def test_left_padded_and_cached_logits_match_full_forward():
    """Logit-level check of the masks/positions generate() builds (stronger than token equality)."""
    model = _model(qwen2.qwen2_tiny)
    prompts = [[5, 17, 99, 3, 42, 7, 8], [11, 2, 4]]
    L = 7
    tokens = torch.tensor([prompts[0], [0] * 4 + prompts[1]])  # [2, 7] second row left-padded
    valid = tokens.new_ones(2, L, dtype=torch.bool)
    valid[1, :4] = False
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [2, 7]
    mask = (torch.ones(L, L, dtype=torch.bool).tril()[None] & valid[:, None]) | torch.eye(L, dtype=torch.bool)
    with torch.no_grad():
        batched = model(tokens, pos, mask=mask)  # [2, 7, V]
        alone = [model(torch.tensor([p]))[0] for p in prompts]
        assert (batched[0] - alone[0]).abs().max() <= 1e-5
        assert (batched[1, 4:] - alone[1]).abs().max() <= 1e-5
        # incremental decoding with a cache reproduces the full forward position by position
        full = model(torch.tensor([prompts[0]]))[0]  # [7, V]
        model.setup_caches(1, 16)
        steps = [model(torch.tensor([[t]]))[0, 0] for t in prompts[0]]
        model.clear_caches()
    assert (torch.stack(steps) - full).abs().max() <= 1e-5
