"""``compile: true``: the fused ops' compiled bodies against the eager bodies and fp64 references.

The eager bodies are themselves checked against eager PyTorch in ``test_fused_ops``; here the
compiled ones must give the same values as the eager ones in fp32 (to rounding), be no further
from an fp64 reference than the eager ones in bf16 (plus one bf16 rounding), keep output dtypes and
strides, and a whole model's loss and gradients must not move.
"""

import json

import pytest
import torch
import yaml
from _recipe_fixtures import tiny_recipe_assets, tiny_sft_config

from tinytune.cli.main import main as tune_main
from tinytune.config import ConfigError
from tinytune.config.recipe_settings import DeviceSettings
from tinytune.kernels import compiled_ops
from tinytune.kernels.fused_ops import apply_rope, rms_norm, swiglu
from tinytune.models.llama3 import llama3_tiny
from tinytune.modules import RotaryPositionalEmbeddings
from tinytune.training.setup import apply_compile_setting


@pytest.fixture
def compile_on():
    compiled_ops.set_compiled(True)
    try:
        yield
    finally:
        compiled_ops.set_compiled(False)


def _cases(dtype):
    """(name, fn, inputs needing grad, fp64 reference fn) for the three ops, odd shapes."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    x, w = rnd(3, 37, 64), (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    gate, up = rnd(3, 37, 96), rnd(3, 37, 96)
    base = rnd(2, 11, 3, 16)  # [b, s, h, d]: q as the attention sees it, a transposed view
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3], list(range(5, 16))])
    cos, sin = RotaryPositionalEmbeddings(16).cos_sin(pos)

    def rms_ref(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rope_ref(b):
        q = b.transpose(1, 2)
        q1, q2 = q.chunk(2, dim=-1)
        return q * cos.double() + torch.cat((-q2, q1), dim=-1) * sin.double()

    return [
        ("rms_norm", lambda x, w: rms_norm(x, w, 1e-5), (x, w), rms_ref),
        ("swiglu", swiglu, (gate, up), lambda a, b: torch.nn.functional.silu(a) * b),
        ("rope", lambda b: apply_rope(b.transpose(1, 2), cos, sin), (base,), rope_ref),
    ]


def _run(fn, inputs, grad_seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, gout)
    return out, grads, gout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_bodies_match_eager_and_the_fp64_reference(dtype, compile_on):
    for name, fn, inputs, ref_fn in _cases(dtype):
        compiled_ops.set_compiled(False)
        e_out, e_grads, gout = _run(fn, inputs)
        compiled_ops.set_compiled(True)
        c_out, c_grads, _ = _run(fn, inputs)
        assert c_out.dtype == e_out.dtype and c_out.stride() == e_out.stride(), name
        leaves = [t.detach().double().requires_grad_() for t in inputs]
        r_out = ref_fn(*leaves)
        r_grads = torch.autograd.grad(r_out, leaves, gout.double())
        for what, c, e, r in [("out", c_out, e_out, r_out)] + [
            (f"grad{i}", cg, eg, rg) for i, (cg, eg, rg) in enumerate(zip(c_grads, e_grads, r_grads))
        ]:
            assert c.dtype == e.dtype, (name, what)
            if dtype == torch.float32:
                torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=f"{name} {what}")
            else:  # no further from fp64 than eager bf16, plus one bf16 rounding of the largest value
                c_err = (c.double() - r).abs().max().item()
                e_err = (e.double() - r).abs().max().item()
                assert c_err <= e_err + 2**-8 * r.abs().max().item(), (name, what, c_err, e_err)
    bodies = {f.__name__ for f in compiled_ops._STATE["compiled"].values()}
    assert {"_rms_norm_forward", "_rms_norm_backward", "_swiglu_forward", "_swiglu_backward", "_rope"} <= bodies


def test_model_loss_and_gradients_do_not_move_under_compile(compile_on):
    torch.manual_seed(0)
    model = llama3_tiny()
    tokens = torch.randint(0, model.tok_embeddings.num_embeddings, (2, 24))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)  # [b, s, v]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    c_loss, c_grads = loss_and_grads()
    compiled_ops.set_compiled(False)
    e_loss, e_grads = loss_and_grads()
    torch.testing.assert_close(c_loss, e_loss, rtol=1e-6, atol=1e-6)
    for n in e_grads:
        torch.testing.assert_close(c_grads[n], e_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_compile_setting_turns_the_bodies_on_and_off():
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    try:
        apply_compile_setting(DeviceSettings(compile=True))
        assert compiled_ops.is_compiled()
        torch.testing.assert_close(torch.rand(3), want)  # turning it on draws nothing from the seeded RNG
        apply_compile_setting(DeviceSettings(compile=False))
        assert not compiled_ops.is_compiled()
    finally:
        compiled_ops.set_compiled(False)


def test_broken_toolchain_is_a_clear_error_naming_the_key(monkeypatch):
    def broken(fn):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return call

    monkeypatch.setattr(compiled_ops, "_compile", broken)
    with pytest.raises(ConfigError, match=r"compile: .*C\+\+ compiler.*set compile: false"):
        apply_compile_setting(DeviceSettings(compile=True))
    assert not compiled_ops.is_compiled()


@pytest.mark.parametrize("recipe", ["lora_finetune", "full_finetune"])
def test_recipe_with_compile_true_trains_the_same_losses(tmp_path, recipe):
    assets = tiny_recipe_assets(tmp_path / "assets")

    def run(name, **over):
        out = tmp_path / name
        cfg = tiny_sft_config(
            assets,
            out,
            batch_size=4,
            shuffle=False,
            max_steps=3,
            optimizer={"name": "adamw", "lr": 1e-3},
            lr_scheduler={"name": "constant"},
            metric_loggers=["jsonl"],
            activation_checkpointing=True,
            **over,
        )
        if recipe == "lora_finetune":
            cfg["model"] = {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 4, "lora_alpha": 8.0}
            cfg["save_merged"] = False
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"# recipe: {recipe}\n" + yaml.safe_dump(cfg))
        assert tune_main(["run", recipe, "--config", str(path)]) in (0, None)
        with open(out / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f if '"loss"' in line]

    try:
        compiled_ops._STATE["compiled"].clear()
        got = run("compiled", compile=True)
        assert compiled_ops.is_compiled() and compiled_ops._STATE["compiled"]  # the recipe turned it on
        want = run("eager")
        assert not compiled_ops.is_compiled()  # and the next run (compile: false) off again
    finally:
        compiled_ops.set_compiled(False)
    assert len(want) == 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
