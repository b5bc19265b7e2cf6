"""Logit parity with Hugging Face transformers for every family (random weights, no hub)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from tinytune.models import llama2, llama3, qwen2, qwen3, smollm2  # noqa: E402

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# (our builder, HF config class name, HF config kwargs) -- the kwargs mirror the tiny builders.
CASES = {
    "llama2": (
        llama2.llama2_tiny,
        "LlamaConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            tie_word_embeddings=False,
        ),
    ),
    "llama3": (
        llama3.llama3_tiny,
        "LlamaConfig",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_parameters={**_LLAMA3_ROPE, "rope_theta": 500_000.0},
            tie_word_embeddings=False,
        ),
    ),
    "qwen2": (
        qwen2.qwen2_tiny,
        "Qwen2Config",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        qwen3.qwen3_tiny,
        "Qwen3Config",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            tie_word_embeddings=False,
        ),
    ),
    "smollm2": (
        smollm2.smollm2_tiny,
        "LlamaConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
            tie_word_embeddings=True,
        ),
    ),
}

_HF_TO_OURS = [
    ("model.embed_tokens.", "tok_embeddings."),
    (".self_attn.", ".attn."),
    (".input_layernorm.", ".sa_norm."),
    (".post_attention_layernorm.", ".mlp_norm."),
    ("model.norm.", "norm."),
    ("model.layers.", "layers."),
    ("lm_head.", "output."),
]


def hf_to_ours(hf_state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Test-local key mapping from HF Llama/Qwen names to the contract names."""
    out = {}
    for key, val in hf_state.items():
        if tied and key == "lm_head.weight":
            continue
        if "rotary_emb" in key:
            continue
        for old, new in _HF_TO_OURS:
            key = key.replace(old, new)
        out[key] = val
    return out


def _pair(family: str, seed: int = 0):
    builder, cfg_name, kwargs = CASES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**kwargs)
    cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # make norms and biases non-trivial so every weight is exercised
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    ours = builder().float().eval()
    missing, unexpected = ours.load_state_dict(hf_to_ours(hf.state_dict(), ours.is_tied), strict=True), None
    del missing, unexpected
    return hf, ours


def _logits_pair(family: str):
    """``(ours, tokens, HF logits, our logits)`` on two random 33-token rows."""
    hf, ours = _pair(family)
    vocab = CASES[family][2]["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return ours, tokens, hf(input_ids=tokens).logits, ours(tokens)  # logits [2, 33, vocab]


@pytest.mark.parametrize("family", list(CASES))
def test_logits_match_hf(family):
    ours, tokens, ref, got = _logits_pair(family)
    with torch.no_grad():
        hidden = ours(tokens, return_hidden=True)  # [2, 33, dim]
    assert ref.abs().max() > 1.0  # non-trivial logits
    assert (got - ref).abs().max().item() <= 1e-4
    torch.testing.assert_close(hidden @ ours.output_weight.T, got, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_logits_match_hf_at_large_positions(family):
    # Positions beyond the llama3 "original" context (64) exercise all rope-scaling bands.
    hf, ours = _pair(family)
    tokens = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(300, 320)[None]
    with torch.no_grad():
        ref = hf(input_ids=tokens, position_ids=pos).logits
        got = ours(tokens, input_pos=pos)
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(CASES))
def test_packed_row_matches_documents_run_alone(family):
    hf, ours = _pair(family)
    vocab = CASES[family][2]["vocab_size"]
    g = torch.Generator().manual_seed(3)
    lens = [[7, 12, 14], [20, 13]]  # each row sums to 33
    docs = [[torch.randint(0, vocab, (1, n), generator=g) for n in row] for row in lens]
    tokens = torch.stack([torch.cat(row, dim=1)[0] for row in docs])  # [2, 33]
    input_pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lens])  # [2, 33]
    seq_lens = torch.tensor([[7, 12, 14], [20, 13, 0]])  # [2, 3]
    with torch.no_grad():
        packed = ours(tokens, input_pos=input_pos, seq_lens=seq_lens)  # [2, 33, vocab]
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                n = doc.shape[1]
                alone_ref = hf(input_ids=doc).logits[0]  # [n, vocab]
                alone_ours = ours(doc)[0]  # [n, vocab]
                assert (packed[b, start : start + n] - alone_ref).abs().max().item() <= 1e-4
                assert (packed[b, start : start + n] - alone_ours).abs().max().item() <= 1e-4
                start += n
        # Without seq_lens the documents would see each other: the check above is not vacuous.
        unpacked = ours(tokens, input_pos=input_pos)
    assert (unpacked - packed).abs().max().item() > 1e-3


def test_bf16_logits_close_to_hf():
    hf, ours = _pair("qwen3")
    hf, ours = hf.bfloat16(), ours.bfloat16()
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits.float()
        got = ours(tokens).float()
    assert (got - ref).abs().max().item() <= 0.1 * ref.abs().max().item()


@pytest.mark.parametrize("backend", ["onednn", "onednn_fast"])
@pytest.mark.parametrize("family", list(CASES))
def test_logits_match_hf_with_every_gemm_on_onednn(family, backend, monkeypatch, cpu_gemm_calls):
    """cpu_gemm=onednn / onednn_fast (every fp32 GEMM of the model, however small) keeps HF parity."""
    from tinytune.kernels import cpu_gemm

    calls = cpu_gemm_calls(backend)
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 0)
    monkeypatch.setattr(cpu_gemm, "MIN_ROWS", 0)
    _, _, ref, got = _logits_pair(family)
    n_layers = CASES[family][2]["num_hidden_layers"]
    assert len(calls) == 7 * n_layers + 1  # q k v o gate up down per layer, and the output
    assert (got - ref).abs().max().item() <= 1e-4
