"""Unit tests for tinytune.modules and the model builders (shapes, masks, init, sizes)."""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tinytune.models import llama2, llama3, qwen2, qwen3, smollm2, transformer_decoder
from tinytune.modules import (
    KVCache,
    RMSNorm,
    RotaryPositionalEmbeddings,
    TiedLinear,
    check_rope_scaling,
    packed_causal_mask,
    seq_lens_to_document_ids,
)
from tinytune.modules.attention import attention

TINY = [llama2.llama2_tiny, llama3.llama3_tiny, qwen2.qwen2_tiny, qwen3.qwen3_tiny, smollm2.smollm2_tiny]

# Official parameter counts (embeddings counted once when tied), from the HF model cards/configs.
OFFICIAL_PARAMS = {
    llama2.llama2_7b: 6_738_415_616,
    llama3.llama3_1_8b: 8_030_261_248,
    llama3.llama3_2_1b: 1_235_814_400,
    llama3.llama3_2_3b: 3_212_749_824,
    qwen2.qwen2_5_0_5b: 494_032_768,
    qwen2.qwen2_5_1_5b: 1_543_714_304,
    qwen2.qwen2_5_7b: 7_615_616_512,
    qwen3.qwen3_0_6b: 596_049_920,
    qwen3.qwen3_1_7b: 1_720_574_976,
    qwen3.qwen3_4b: 4_022_468_096,
    qwen3.qwen3_8b: 8_190_735_360,
    smollm2.smollm2_135m: 134_515_008,
    smollm2.smollm2_360m: 361_821_120,
    smollm2.smollm2_1_7b: 1_711_376_384,
}


def test_smollm2_135m_param_count_on_meta():
    # HF config: vocab 49152, dim 576, 30 layers, 9 heads, 3 kv heads, hidden 1536, tied.
    with torch.device("meta"):
        model = smollm2.smollm2_135m()
    emb = 49152 * 576
    per_layer = 576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536 + 2 * 576
    assert emb + 30 * per_layer + 576 == 134_515_008
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "output.weight" not in model.state_dict()


@pytest.mark.parametrize("builder", list(OFFICIAL_PARAMS), ids=lambda b: b.__name__)
def test_real_sizes_param_counts(builder):
    with torch.device("meta"):
        model = builder()
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[builder]


@pytest.mark.parametrize("builder", TINY, ids=lambda b: b.__name__)
def test_tiny_forward_shapes_and_initial_loss(builder):
    torch.manual_seed(0)
    model = builder()
    vocab = model.tok_embeddings.num_embeddings
    tokens = torch.randint(0, vocab, (2, 17))
    logits = model(tokens)
    assert logits.shape == (2, 17, vocab)
    hidden = model(tokens, return_hidden=True)
    assert hidden.shape == (2, 17, model.tok_embeddings.embedding_dim)
    torch.testing.assert_close(F.linear(hidden, model.output_weight), logits)
    targets = torch.randint(0, vocab, (2, 17))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert abs(loss.item() - math.log(vocab)) < 0.1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_names_follow_contract():
    sd = qwen3.qwen3_tiny().state_dict()
    for key in [
        "tok_embeddings.weight",
        "layers.0.sa_norm.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.v_proj.weight",
        "layers.0.attn.o_proj.weight",
        "layers.0.attn.q_norm.weight",
        "layers.0.attn.k_norm.weight",
        "layers.0.mlp_norm.weight",
        "layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.up_proj.weight",
        "layers.0.mlp.down_proj.weight",
        "norm.weight",
        "output.weight",
    ]:
        assert key in sd, key
    assert sd["layers.0.attn.q_norm.weight"].shape == (32,)
    q2 = qwen2.qwen2_tiny().state_dict()
    assert {"layers.1.attn.q_proj.bias", "layers.1.attn.k_proj.bias", "layers.1.attn.v_proj.bias"} <= set(q2)
    assert "layers.1.attn.o_proj.bias" not in q2 and "output.weight" not in q2
    assert not any(k.endswith(".bias") for k in llama3.llama3_tiny().state_dict())


def test_init_values():
    model = qwen2.qwen2_tiny()
    sd = model.state_dict()
    assert torch.all(sd["layers.0.attn.q_proj.bias"] == 0)
    assert torch.all(sd["layers.0.sa_norm.weight"] == 1)
    std = sd["layers.0.mlp.up_proj.weight"].std().item()
    assert 0.017 < std < 0.023


def test_linear_factory_called_with_contract_names():
    calls = []

    def factory(name, in_dim, out_dim, bias):
        calls.append((name, in_dim, out_dim, bias))
        return nn.Linear(in_dim, out_dim, bias=bias)

    transformer_decoder(
        vocab_size=100,
        dim=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        hidden_dim=48,
        max_seq_len=64,
        rope_base=1e4,
        qkv_bias=True,
        linear_factory=factory,
    )
    assert calls == [
        ("q_proj", 32, 32, True),
        ("k_proj", 32, 16, True),
        ("v_proj", 32, 16, True),
        ("o_proj", 32, 32, False),
        ("gate_proj", 32, 48, False),
        ("up_proj", 32, 48, False),
        ("down_proj", 48, 32, False),
        ("output", 32, 100, False),
    ]


def test_tied_output_shares_embedding():
    model = smollm2.smollm2_tiny()
    assert isinstance(model.output, TiedLinear)
    assert model.output_weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len(model.state_dict())


def test_bad_hyperparameters_raise():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        transformer_decoder(
            vocab_size=10,
            dim=12,
            n_layers=1,
            n_heads=3,
            n_kv_heads=2,
            head_dim=4,
            hidden_dim=8,
            max_seq_len=8,
            rope_base=1e4,
        )
    with pytest.raises(ValueError, match="not supported"):
        check_rope_scaling({"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="missing keys"):
        check_rope_scaling({"rope_type": "llama3", "factor": 8.0})


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 8)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)
    assert norm.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16


def test_rope_is_relative_and_norm_preserving():
    rope = RotaryPositionalEmbeddings(16, base=10_000.0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)

    def score(i, j):
        qi = rope(q, torch.tensor([[i]]))
        kj = rope(k, torch.tensor([[j]]))
        return (qi * kj).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100))
    torch.testing.assert_close(rope(q, torch.tensor([[5]])).norm(), q.norm())
    torch.testing.assert_close(rope(q, torch.tensor([[0]])), q)


def test_rope_llama3_scaling_bands():
    plain = RotaryPositionalEmbeddings(128, base=500_000.0).inv_freq(torch.device("cpu"))
    scaled = RotaryPositionalEmbeddings(
        128,
        base=500_000.0,
        rope_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ).inv_freq(torch.device("cpu"))
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192
    torch.testing.assert_close(scaled[high], plain[high])
    torch.testing.assert_close(scaled[low], plain[low] / 8)
    mid = ~high & ~low
    assert mid.any() and torch.all(scaled[mid] < plain[mid]) and torch.all(scaled[mid] > plain[mid] / 8)


def test_seq_lens_to_document_ids_and_mask():
    seq_lens = torch.tensor([[2, 3, 1, 0], [6, 0, 0, 0]])
    ids = seq_lens_to_document_ids(seq_lens, 6)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]]
    mask = packed_causal_mask(ids)
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0, 3].tolist() == [False, False, True, True, False, False]
    assert mask[1, 0].equal(torch.ones(6, 6, dtype=torch.bool).tril())


def _reference_attention(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, h, s, s_kv]
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def test_attention_causal_packed_and_explicit_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(attention(q, k, v), _reference_attention(q, k, v, causal))
    seq_lens = torch.tensor([[2, 4], [3, 3]])
    packed = packed_causal_mask(seq_lens_to_document_ids(seq_lens, 6))
    torch.testing.assert_close(attention(q, k, v, seq_lens=seq_lens), _reference_attention(q, k, v, packed))
    explicit = torch.rand(2, 3, 6) > 0.5
    explicit[..., 0] = True
    out = attention(q[:, :, :3], k, v, kv_cache_mask=explicit)
    torch.testing.assert_close(out, _reference_attention(q[:, :, :3], k, v, explicit[:, None]))
    with pytest.raises(ValueError, match="kv_cache_mask"):
        attention(q[:, :, :3], k, v)


def test_kv_cache_update_and_overflow():
    cache = KVCache(1, 4, 2, 8)
    k, v = cache.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
    assert k.shape == (1, 2, 3, 8) and cache.size == 3
    with pytest.raises(ValueError, match="overflow"):
        cache.update(torch.ones(1, 2, 2, 8), torch.ones(1, 2, 2, 8))
    cache.reset()
    assert cache.size == 0


@pytest.mark.parametrize("packed", [False, True])
def test_kernel_branch_matches_sdpa(monkeypatch, packed):
    """Route attention through the Triton kernel (interpreter on CPU) and compare with SDPA."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    import tinytune.modules.attention as attn_mod

    if attn_mod._flash_kernel() is None:
        pytest.skip("tinytune.kernels.flash_attention is not importable")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs on CUDA, or the CPU interpreter
    torch.manual_seed(0)
    model = qwen3.qwen3_tiny().to(dev)
    tokens = torch.randint(0, 512, (2, 24), device=dev)
    kw = {}
    if packed:
        kw = dict(
            input_pos=torch.tensor([list(range(10)) + list(range(14)), list(range(24))], device=dev),
            seq_lens=torch.tensor([[10, 14], [24, 0]], device=dev),
        )
    with torch.no_grad():
        ref = model(tokens, **kw)
        monkeypatch.setattr(attn_mod, "_use_kernel", lambda q, packed: True)
        got = model(tokens, **kw)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "mode, packed, expected",
    [
        ("", True, True),
        ("", False, True),
        ("auto", False, True),
        ("packed", True, True),
        ("packed", False, False),
        ("sdpa", True, False),
        ("SDPA", False, False),
    ],
)
def test_attention_dispatch_on_cuda(monkeypatch, mode, packed, expected):
    """On CUDA the Triton kernel takes training calls; TINYTUNE_ATTENTION=sdpa|packed overrides."""
    from types import SimpleNamespace

    from tinytune.modules import attention as attn_mod

    monkeypatch.setattr(attn_mod, "_flash_kernel", lambda: object())
    monkeypatch.setenv("TINYTUNE_ATTENTION", mode)
    assert attn_mod._use_kernel(SimpleNamespace(is_cuda=True), packed) is expected
    assert attn_mod._use_kernel(SimpleNamespace(is_cuda=False), packed) is False
