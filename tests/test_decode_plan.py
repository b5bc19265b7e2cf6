"""decode_layout's DecodePlan (fused, merged, packed decode-time weights and a lean one-position step).

References: HF transformers' ``generate`` (greedy tokens, batch 1 and left-padded batches) and our
own module path (logits of every decode step, LoRA adapters unmerged). Also: the model's
parameters are untouched, weights changed inside the block are picked up, models the plan does not
cover fall back, the cache end, stop tokens.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tinytune.generation import _PLANS, decode_layout, generate  # noqa: E402
from tinytune.models import llama3, lora_builders, qwen2, qwen3, smollm2  # noqa: E402
from tinytune.modules.decode_plan import DecodePlan  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_generation import _model  # noqa: E402

# lengths 6, 2, 4, 1: left padding of 0-5 positions
PROMPTS = [[5, 17, 99, 3, 42, 7], [11, 2], [200, 13, 14, 15], [9]]
TINY = [llama3.llama3_tiny, qwen2.qwen2_tiny, qwen3.qwen3_tiny, smollm2.smollm2_tiny]


def _count_steps(monkeypatch) -> list[int]:
    calls: list[int] = []
    step = DecodePlan.step

    def counted(self, tokens, input_pos, mask):
        calls.append(tokens.shape[0])
        return step(self, tokens, input_pos, mask)

    monkeypatch.setattr(DecodePlan, "step", counted)
    return calls


def _hf_greedy(hf, prompts, new_tokens):
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)  # [b, L] left-padded
    attn = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, width - len(p) :] = 1
    out = hf.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[:, width:].tolist()


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3"])
def test_greedy_matches_hf_generate_batch_1_and_left_padded(family, monkeypatch):
    pytest.importorskip("transformers")
    from test_model_parity import _pair

    hf, ours = _pair(family)
    steps = _count_steps(monkeypatch)
    batch_ref = _hf_greedy(hf, PROMPTS, 10)
    alone_ref = [_hf_greedy(hf, [p], 10)[0] for p in PROMPTS]
    assert batch_ref == alone_ref  # HF itself: padding does not change its tokens here
    assert len({t for r in batch_ref for t in r}) > 5  # varied predictions, not a repeated token
    with decode_layout(ours):
        assert generate(ours, PROMPTS, 10) == batch_ref
        assert [generate(ours, [p], 10)[0] for p in PROMPTS] == alone_ref
    assert steps == [4] * 9 + [1] * 9 * 4  # every decode step ran through the plan
    assert generate(ours, PROMPTS, 10) == batch_ref  # and after the block, the module path


@pytest.mark.parametrize("builder", TINY, ids=lambda b: b.__name__)
def test_step_logits_match_module_path(builder):
    """Each decode step's logits vs the module path's, on left-padded rows (qkv bias, q/k norm, tied/untied)."""
    model = _model(builder)
    plan = DecodePlan.build(model)
    assert plan is not None
    tokens = torch.tensor([[0, 5, 6, 7, 8, 9], [8, 9, 10, 11, 12, 13], [0, 0, 14, 15, 16, 17]])  # [3, 6]
    valid = tokens != 0  # left padding inside the prefill; every decoded position is real
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # [3, 6]
    bias = torch.zeros(3, 1, 1, 6).masked_fill_(~valid[:, None, None], float("-inf"))  # [3, 1, 1, 6]
    with torch.inference_mode():
        mask = (torch.ones(6, 6, dtype=torch.bool).tril()[None] & valid[:, None]) | torch.eye(6, dtype=torch.bool)
        ref = model(tokens, pos, mask=mask)  # [3, 6, V] full forward
        model.setup_caches(3, 6)
        model(tokens[:, :3], pos[:, :3], mask=mask[:, :3, :3])  # prefill 3 positions through the modules
        plan.prepare(3, 6)
        for t in range(3, 6):
            got = plan.step(tokens[:, t], pos[:, t], bias[..., : t + 1])  # [3, V]
            torch.testing.assert_close(got, ref[:, t], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="KVCache overflow"):
            plan.step(tokens[:, 5], pos[:, 5], None)
        model.clear_caches()


def _lora_model(builder, seed=0, **keys):
    torch.manual_seed(seed)
    model = lora_builders.lora_model(builder, lora_rank=4, lora_alpha=8.0, **keys).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)  # lora_b too: the adapters change the tokens
    return model


@pytest.mark.parametrize(
    "builder,keys",
    [
        (
            llama3.llama3_tiny,
            dict(lora_attn_modules=["q_proj", "k_proj", "v_proj", "o_proj"], apply_lora_to_output=True),
        ),
        (qwen2.qwen2_tiny, dict(lora_attn_modules=["q_proj", "v_proj"])),  # tied output, qkv bias
        (qwen3.qwen3_tiny, dict(lora_attn_modules=["k_proj"], use_dora=True)),
    ],
    ids=["llama3-all+output", "qwen2-tied", "qwen3-dora"],
)
def test_lora_merged_in_plan_and_parameters_untouched(builder, keys, monkeypatch):
    model = _lora_model(builder, **keys)
    ref = generate(model, PROMPTS, 8)  # adapters applied unmerged by the modules
    for m in model.modules():
        if hasattr(m, "disabled"):
            m.disabled = True
    ref_off = generate(model, PROMPTS, 8)
    for m in model.modules():
        if hasattr(m, "disabled"):
            m.disabled = False
    assert ref != ref_off  # the adapters matter
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    steps = _count_steps(monkeypatch)
    with decode_layout(model):
        assert generate(model, PROMPTS, 8) == ref
        for m in model.modules():  # switched off inside the block: the plan follows
            if hasattr(m, "disabled"):
                m.disabled = True
        assert generate(model, PROMPTS, 8) == ref_off
        for m in model.modules():
            if hasattr(m, "disabled"):
                m.disabled = False
        assert generate(model, PROMPTS, 8) == ref
    assert len(steps) == 3 * 7
    assert not _PLANS
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].is_contiguous() and torch.equal(after[k], v), k
    for n, p in model.named_parameters():
        assert params[n] == (p, p.data_ptr()), n


def test_weights_changed_inside_the_block_are_used():
    model, other = _model(seed=0), _model(seed=1)
    ref, ref_other = generate(model, PROMPTS, 8), generate(other, PROMPTS, 8)
    assert ref != ref_other
    keep = {k: v.clone() for k, v in model.state_dict().items()}
    with decode_layout(model):
        assert generate(model, PROMPTS, 8) == ref
        model.load_state_dict(other.state_dict())  # in-place copies
        assert generate(model, PROMPTS, 8) == ref_other
        with torch.no_grad():
            model.layers[1].mlp.down_proj.weight.data = keep["layers.1.mlp.down_proj.weight"].clone()  # swapped .data
            model.load_state_dict(keep)
        assert generate(model, PROMPTS, 8) == ref


def test_fallbacks_without_a_plan():
    pytest.importorskip("torchao")
    qlora = lora_builders.qlora_llama3_tiny(lora_attn_modules=["q_proj", "v_proj"]).eval()
    assert DecodePlan.build(qlora) is None  # NF4 bases stay compressed
    dropout = lora_builders.lora_llama3_tiny(lora_dropout=0.1)  # training mode: dropout is live
    assert DecodePlan.build(dropout) is None
    assert DecodePlan.build(dropout.eval()) is not None
    assert DecodePlan.build(torch.nn.Linear(4, 4)) is None
    mixed = _model()
    mixed.norm.to(torch.float64)  # one parameter in another dtype: no single-dtype weight buffer
    assert DecodePlan.build(mixed) is None

    torch.manual_seed(0)
    ref = generate(qlora, PROMPTS, 6)
    w = qlora.layers[0].attn.k_proj.weight  # a plain (not adapted) weight
    with decode_layout(qlora):
        assert not _PLANS
        assert not w.is_contiguous() and w.t().is_contiguous()  # the in-place column-major layout
        assert generate(qlora, PROMPTS, 6) == ref
    assert w.is_contiguous()
    # NF4's dequantization scratch buffers, first made under generate's inference_mode, serve training too
    qlora.train()
    qlora(torch.tensor(PROMPTS[:1])).sum().backward()
    assert qlora.layers[0].attn.q_proj.lora_a.weight.grad is not None


def test_cache_end_stop_tokens_and_nesting(monkeypatch):
    model = _model(qwen3.qwen3_tiny)
    full = generate(model, PROMPTS, 9)
    stop = full[1][2]
    stopped = generate(model, PROMPTS, 9, stop_tokens=[stop])
    assert any(len(r) < 9 for r in stopped) and any(len(r) == 9 for r in stopped)
    steps = _count_steps(monkeypatch)
    with decode_layout(model):
        with decode_layout(model):  # nested: the outer block keeps the plan
            assert generate(model, PROMPTS, 9) == full
        assert _PLANS
        assert generate(model, PROMPTS, 9, stop_tokens=[stop]) == stopped
        assert generate(model, PROMPTS, 9, use_cache=False) == full  # no cache: the modules, not the plan
        # caches held by the caller, exactly prompt + new tokens long: the last slot is used
        model.setup_caches(len(PROMPTS), 6 + 9)
        assert generate(model, PROMPTS, 9) == full
        assert model.layers[0].attn.kv_cache.size == 6 + 9 - 1  # the last token is never fed back
        with pytest.raises(ValueError, match="needs 4 x 16"):
            generate(model, PROMPTS, 10)
        model.clear_caches()
        # every row stops on its first token: no decode step at all
        firsts = sorted({r[0] for r in full})
        n = len(steps)
        assert generate(model, PROMPTS, 9, stop_tokens=firsts) == [[] for _ in PROMPTS]
        assert len(steps) == n
    assert not _PLANS


def test_packed_weights_follow_the_batch_size():
    if not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")):
        pytest.skip("this torch has no MKL packed GEMM")
    model = _model(llama3.llama3_tiny)
    ref = generate(model, PROMPTS, 8)
    ref1 = generate(model, PROMPTS[:1], 8)
    with decode_layout(model):
        plan = _PLANS[id(model)]
        assert generate(model, PROMPTS, 8) == ref
        assert plan.output.packed is not None and plan.layers[0].qkv.rows == len(PROMPTS)
        assert generate(model, PROMPTS[:1], 8) == ref1
        assert plan.output.packed is None  # one row: the column-major matrices, unpacked
        assert generate(model, PROMPTS[:3], 8) == ref[:3]


def test_bf16_plan_close_to_module_path():
    model = _model(qwen2.qwen2_tiny).to(torch.bfloat16)
    plan = DecodePlan.build(model)
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        ref = model(tokens)[0, -1].float()  # [V]
        model.setup_caches(1, 4)
        model(tokens[:, :3])
        plan.prepare(1, 4)
        got = plan.step(tokens[:, 3], torch.tensor([3]), None)[0].float()
        model.clear_caches()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert got.argmax() == ref.argmax()


def test_sampling_and_streaming_inside_the_block():
    model = _model(smollm2.smollm2_tiny)
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=40, top_p=0.95)
    ref = generate(model, PROMPTS, generator=torch.Generator().manual_seed(3), **kw)
    streamed: list[tuple[int, int]] = []
    with decode_layout(model):
        got = generate(
            model,
            PROMPTS,
            generator=torch.Generator().manual_seed(3),
            on_token=lambda r, t: streamed.append((r, t)),
            **kw,
        )
        assert generate(model, PROMPTS, 1) == [r[:1] for r in generate(model, PROMPTS, 3)]  # no decode step at all
    assert got == ref
    assert sorted(streamed) == sorted((r, t) for r, toks in enumerate(got) for t in toks)
