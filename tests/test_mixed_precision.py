"""Mixed precision (``dtype: bf16`` + ``mixed_precision: true``): bf16 compute, fp32 master weights
and optimizer state.

References: eager PyTorch ops under ``torch.autocast`` for the fused kernels and the model's loss;
an fp32 run for the gradients; the bf16 rounding rule for why mixed precision exists (an update
below half a bf16 ulp of its weight is lost in pure bf16, kept by the fp32 master).
"""

import pytest
import torch
import torch.nn.functional as F
from _recipe_fixtures import make_tiny_checkpoint
from omegaconf import OmegaConf

import tinytune.modules.peft.lora as lora_mod
from tinytune.checkpoint import load_hf_model
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import (
    DPOSettings,
    FullFinetuneDistributedSettings,
    FullFinetuneSettings,
    LoRAFinetuneDistributedSettings,
    LoRAFinetuneSettings,
)
from tinytune.kernels import linear_cross_entropy
from tinytune.kernels.fused_ops import lora_linear
from tinytune.modules.peft import lora_linear_factory, set_trainable_params
from tinytune.training import Precision, optimizer_step, sft_loss

CPU = torch.device("cpu")
BF16 = torch.bfloat16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


# ---- settings --------------------------------------------------------------------------------------


def _settings(cls, **keys):
    return cls.from_config(
        OmegaConf.create(
            {
                "output_dir": "x",
                "dataset": {"_component_": "tinytune.datasets.chat_dataset", "source": "x.jsonl"},
                **keys,
            }
        )
    )


def test_mixed_precision_setting_needs_bf16_and_a_bool():
    for cls in (LoRAFinetuneSettings, FullFinetuneSettings):
        assert _settings(cls, dtype="bf16", mixed_precision=True).hardware.mixed_precision is True
        assert _settings(cls, dtype="bf16").hardware.mixed_precision is False
        with pytest.raises(ConfigError, match="mixed_precision: true needs dtype: bf16"):
            _settings(cls, dtype="fp32", mixed_precision=True)
        with pytest.raises(ConfigError, match="mixed_precision: expected bool"):
            _settings(cls, dtype="bf16", mixed_precision="yes")
    # recipes that do not implement it do not accept the key (an unknown key, not silently ignored)
    with pytest.raises(ConfigError, match="mixed_precision"):
        _settings(DPOSettings, dtype="bf16", mixed_precision=True)
    with pytest.raises(ConfigError, match="needs dtype: bf16"):
        Precision.from_settings(True, torch.float32, CPU)


def test_distributed_recipes_state_that_bf16_is_mixed_there():
    """FSDP2 keeps fp32 shards and computes in bf16 (MixedPrecisionPolicy): the key may say so, not deny it."""
    for cls in (FullFinetuneDistributedSettings, LoRAFinetuneDistributedSettings):
        assert _settings(cls, dtype="bf16", mixed_precision=True).hardware.mixed_precision is True
        assert _settings(cls, dtype="bf16").hardware.mixed_precision is None
        with pytest.raises(ConfigError, match="no pure-bf16 mode"):
            _settings(cls, dtype="bf16", mixed_precision=False)
        with pytest.raises(ConfigError, match="needs dtype: bf16"):
            _settings(cls, dtype="fp32", mixed_precision=True)
    from tinytune.config.recipe_settings import FSDPSettings
    from tinytune.training import fsdp_policy

    policy = fsdp_policy(FSDPSettings(), torch.bfloat16)
    assert policy["param_dtype"] == torch.bfloat16 and policy["reduce_dtype"] == torch.float32


# ---- the fused kernels under autocast equal eager autocast ops ---------------------------------------


def test_lora_linear_under_autocast_matches_eager_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 32, generator=g)
    w = torch.randn(48, 32, generator=g) / 6
    b = torch.randn(48, generator=g)
    a0 = torch.randn(4, 32, generator=g) / 6
    b0 = torch.randn(48, 4, generator=g) / 2
    ins = [t.clone().requires_grad_(True) for t in (x, w, b, a0, b0)]
    ref = [t.clone().requires_grad_(True) for t in (x, w, b, a0, b0)]
    with torch.autocast("cpu", dtype=BF16):
        out = lora_linear(*ins, 2.0)
        want = F.linear(ref[0], ref[1], ref[2]) + 2.0 * F.linear(F.linear(ref[0], ref[3]), ref[4])
    assert out.dtype == want.dtype == BF16
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    gy = torch.randn(out.shape, generator=g)
    out.float().backward(gy)
    want.float().backward(gy)
    for name, t, r in zip("x w b A B".split(), ins, ref):
        assert t.grad.dtype == torch.float32, name  # fp32 leaves get fp32 gradients through the cast
        assert _rel(t.grad, r.grad) < 1e-2, name


def test_linear_cross_entropy_under_autocast_matches_eager_autocast():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g)
    w = torch.randn(96, 32, generator=g) / 4
    labels = torch.randint(0, 96, (40,), generator=g)
    labels[::5] = -100
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16):
        got = linear_cross_entropy(h1, w1, labels, reduction="sum", chunk_size=16)
        logits = h2 @ w2.t()  # [N, V] bf16 under autocast
        want = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-4)
    got.backward()
    want.backward()
    assert h1.grad.dtype == w1.grad.dtype == torch.float32
    assert _rel(h1.grad, h2.grad) < 1e-2 and _rel(w1.grad, w2.grad) < 1e-2


# ---- the model: loss vs eager autocast, gradients vs fp32 ------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("mixed") / "tiny"))


def _batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (3, 40), generator=g)  # [b, s]
    labels = tokens.roll(-1, 1)
    labels[:, :10] = -100
    labels[:, -1] = -100
    return {"tokens": tokens, "labels": labels}


def _lora_model(ckpt, precision: Precision, seed: int = 0):
    factory = lora_linear_factory(TARGETS, rank=4, alpha=8.0)
    model, _ = load_hf_model(ckpt, dtype=precision.load_dtype, linear_factory=factory)
    set_trainable_params(model)
    torch.manual_seed(seed)
    with torch.no_grad():  # non-zero B, so A gets gradients too
        for n, p in model.named_parameters():
            if "lora_b" in n:
                p.normal_(0, 0.05)
    precision.cast_frozen(model)
    return model


def test_mixed_lora_model_loss_equals_eager_autocast_reference(ckpt, monkeypatch):
    mixed = Precision.from_settings(True, BF16, CPU)
    model = _lora_model(ckpt, mixed)
    batch = _batch(model.tok_embeddings.num_embeddings)
    with mixed.autocast():
        got = sft_loss(model, batch)
    # reference: the eager LoRA path (F.linear per projection) and full logits + F.cross_entropy
    monkeypatch.setattr(lora_mod, "plain_tensors", lambda *t: False)
    with mixed.autocast():
        logits = model(batch["tokens"])  # [b, s, V]
        want = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert float(got) == pytest.approx(float(want), rel=2e-3)


def test_mixed_step_gradients_match_fp32_and_state_is_fp32(ckpt):
    fp32 = Precision.from_settings(False, torch.float32, CPU)
    mixed = Precision.from_settings(True, BF16, CPU)
    ref, model = _lora_model(ckpt, fp32), _lora_model(ckpt, mixed)
    batch = _batch(model.tok_embeddings.num_embeddings)
    sft_loss(ref, batch).backward()
    with mixed.autocast():
        loss = sft_loss(model, batch)
    loss.backward()
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:  # adapters: fp32 master weights with fp32 gradients
            assert p.dtype == p.grad.dtype == torch.float32, n
            assert _rel(p.grad, grads_ref[n]) < 3e-2, n
        else:  # the frozen base is stored in bf16
            assert p.dtype == BF16, n
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    optimizer_step(model, opt, clip_grad_norm=1.0)
    states = list(opt.state.values())
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


def _full_model(ckpt, precision: Precision):
    model, _ = load_hf_model(ckpt, dtype=precision.load_dtype)
    model.requires_grad_(True)
    precision.cast_frozen(model)
    return model


def test_small_updates_survive_in_mixed_and_are_lost_in_pure_bf16(ckpt):
    """Why mixed precision exists. The RMSNorm weights start at exactly 1.0, where a bf16 step is
    2^-7; AdamW with lr 1e-3 moves a weight by about lr per step, below half that step (2^-8), so
    pure bf16 rounds every update back to 1.0, while the fp32 master accumulates them."""
    steps, lr = 3, 1e-3
    for mode in ("bf16", "mixed"):
        precision = Precision.from_settings(mode == "mixed", BF16, CPU)
        model = _full_model(ckpt, precision)
        norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
        assert norms and all(bool((p == 1).all()) for p in norms)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for i in range(steps):
            with precision.autocast():
                loss = sft_loss(model, _batch(model.tok_embeddings.num_embeddings, seed=i))
            loss.backward()
            optimizer_step(model, opt)
        moved = torch.cat([(p.detach().float() - 1).abs().flatten() for p in norms])  # [n]
        if mode == "bf16":
            assert all(p.dtype == BF16 for p in norms)
            assert float(moved.max()) == 0.0  # every update rounded away
        else:
            assert all(p.dtype == torch.float32 for p in norms)
            # Adam's first steps move each weight by ~lr (sign of a consistent gradient)
            assert float(moved.median()) > 0.5 * steps * lr
            assert float(moved.max()) <= steps * lr * 1.01


# ---- loading: a mixed-precision LoRA base read straight into bf16 ----------------------------------


def _loaded(ckpt, frozen_dtype, **lora):
    """The LoRA model as the recipe builds it, from the same seed: load, freeze, cast the frozen."""
    mixed = Precision.from_settings(True, BF16, CPU)
    torch.manual_seed(0)
    factory = lora_linear_factory(TARGETS, rank=4, alpha=8.0, **lora)
    model, _ = load_hf_model(ckpt, dtype=mixed.load_dtype, linear_factory=factory, frozen_dtype=frozen_dtype)
    dtypes_at_load = {n: p.dtype for n, p in model.named_parameters() if type(p.data) is torch.Tensor}
    set_trainable_params(model)
    mixed.cast_frozen(model)
    return model, dtypes_at_load


@pytest.mark.parametrize("lora", [{}, {"use_dora": True}, {"init": "pissa"}], ids=["lora", "dora", "pissa"])
def test_mixed_lora_base_loaded_in_bf16_gives_the_same_model_bits(ckpt, lora):
    """Reading the checkpoint straight into bf16 (no fp32 copy of the base) must give the model an
    fp32 load followed by cast_frozen gives: every parameter's dtype and bits, the adapters' random
    init included. DoRA and PiSSA read the base to initialise, so they keep the fp32 load."""
    want, want_at_load = _loaded(ckpt, None, **lora)
    got, got_at_load = _loaded(ckpt, BF16, **lora)
    assert set(dict(want.named_parameters())) == set(dict(got.named_parameters()))
    for (n, a), (_, b) in zip(want.named_parameters(), got.named_parameters()):
        assert a.dtype == b.dtype and a.requires_grad == b.requires_grad, n
        assert torch.equal(a.detach().view(torch.uint8), b.detach().view(torch.uint8)), n  # bitwise
    base = [n for n in got_at_load if "lora_" not in n]
    assert base and all(want_at_load[n] == torch.float32 for n in base)
    if lora:  # the base read at full precision, then cast as before
        assert all(got_at_load[n] == torch.float32 for n in base)
    else:  # never an fp32 copy of the base
        assert all(got_at_load[n] == BF16 for n in base)
        assert all(got_at_load[n] == torch.float32 for n in got_at_load if "lora_" in n)


def test_base_read_in_full_names_the_lora_variants_that_need_an_fp32_base(ckpt):
    from tinytune.checkpoint.model_info import read_model_info  # noqa: PLC0415
    from tinytune.checkpoint.model_loading import base_read_in_full, build_model  # noqa: PLC0415

    info = read_model_info(ckpt)
    for kw, want in [
        ({}, False),
        ({"use_dora": True}, True),
        ({"init": "pissa"}, True),
        ({"quantize_base": True}, True),
    ]:
        with torch.device("meta"):
            model = build_model(info, lora_linear_factory(TARGETS, rank=4, alpha=8.0, **kw))
        assert base_read_in_full(model) is want, kw
    with torch.device("meta"):
        assert base_read_in_full(build_model(info)) is False
