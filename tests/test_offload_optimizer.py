"""``optimizer.name: adamw_offload`` (torchao ``CPUOffloadOptimizer``) in the shared optimizer step.

torchao's offload optimizer refuses CPU parameters (the builder then runs plain AdamW, tested in
``test_optimizers_small_memory.py``), so its steps are checked on CUDA (``gpu``): LoRA steps with
gradient accumulation and active clipping give plain ``torch.optim.AdamW``'s parameters, directly
and through the ``lora_finetune`` recipe. On CPU: the step re-copies clipped gradients to the
optimizer's host copies (against an object with the offload optimizer's protocol), and fp16 loss
scaling refuses it."""

import pytest
import torch
from _recipe_fixtures import make_tiny_checkpoint, write_chat_jsonl
from omegaconf import OmegaConf

from tinytune.config import ConfigError
from tinytune.models import llama_decoder
from tinytune.modules.peft import lora_linear_factory, set_trainable_params
from tinytune.training import LossScaler, build_optimizer, optimizer_step, sft_accumulate

CLIP = 0.05  # far below the gradient norms here: every step clips


class _HostCopyOptimizer(torch.optim.Optimizer):
    """The protocol of torchao's CPUOffloadOptimizer, on CPU: a post-accumulate-grad hook copies each
    gradient to a separate host tensor when backward produces it, and ``step`` updates the host copy
    and writes it back. Anything done to ``p.grad`` after backward (clipping) misses the update
    unless it is copied again."""

    class _Done:
        def synchronize(self):
            pass

    def __init__(self, params, lr):
        params = list(params)
        self.param_d2h_map = {}
        self.queue = {}
        self.inner = {}
        for p in params:
            host = p.detach().clone()
            host.grad = torch.zeros_like(host)
            self.param_d2h_map[p] = host
            self.inner[p] = torch.optim.SGD([host], lr=lr)
            p.register_post_accumulate_grad_hook(self._hook)
        super().__init__(params, {"lr": lr})

    def _hook(self, p):
        self.param_d2h_map[p].grad.copy_(p.grad)
        self.queue[p] = self._Done()

    @torch.no_grad()
    def step(self, closure=None):
        for p in self.queue:
            self.inner[p].step()
            p.copy_(self.param_d2h_map[p])
        self.queue.clear()

    def zero_grad(self, set_to_none=True):
        for p in self.param_d2h_map:
            p.grad = None


def _lora_model(device="cpu", rank=8, dim=64, seed=0):
    torch.manual_seed(seed)
    model = llama_decoder(
        vocab_size=128,
        dim=dim,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=dim // 4,
        hidden_dim=2 * dim,
        max_seq_len=64,
        rope_base=1e4,
        norm_eps=1e-5,
        tie_embeddings=True,
        linear_factory=lora_linear_factory(["q_proj", "v_proj", "up_proj"], rank=rank, alpha=2.0 * rank),
    )
    with torch.no_grad():  # B starts at 0; make every adapter matter from step 1
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.02)
    set_trainable_params(model)
    return model.to(device)


def _windows(n, accum, device):
    g = torch.Generator().manual_seed(3)
    return [
        [
            {k: torch.randint(0, 128, (2, 16), generator=g).to(device) for k in ("tokens", "labels")}
            for _ in range(accum)
        ]
        for _ in range(n)
    ]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _train(model, opt, windows, device):
    for i, window in enumerate(windows):
        loss, _ = sft_accumulate(model, window, torch.device(device), padding_free=False)
        optimizer_step(model, opt, None, CLIP, loss=loss, step=i + 1)
    return model


def test_clipped_gradients_reach_the_host_copies():
    windows = _windows(3, 2, "cpu")
    ref = _lora_model()
    _train(ref, torch.optim.SGD(trainable(ref), lr=0.5), windows, "cpu")
    got = _lora_model()
    _train(got, _HostCopyOptimizer(trainable(got), lr=0.5), windows, "cpu")
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


def test_fp16_loss_scaling_refuses_the_offload_optimizer():
    model = _lora_model()
    opt = _HostCopyOptimizer(trainable(model), lr=0.1)
    scaler = LossScaler(torch.amp.GradScaler("cpu"), "cpu", autocast_dtype=None)
    with pytest.raises(ConfigError, match="adamw_offload .* cannot run with dtype: fp16"):
        scaler.unscale_(opt)


@pytest.mark.gpu
def test_offload_lora_steps_match_adamw_on_cuda():
    """rank 64 on dim 64: each adapter matrix has 4096 elements, torchao's offload threshold."""
    windows = _windows(4, 2, "cuda")
    ref = _lora_model("cuda", rank=64)
    _train(ref, torch.optim.AdamW(trainable(ref), lr=1e-2, weight_decay=0.0), windows, "cuda")
    got = _lora_model("cuda", rank=64)
    opt = build_optimizer(got.parameters(), name="adamw_offload", lr=1e-2)
    assert type(opt).__name__ == "CPUOffloadOptimizer" and len(opt.param_d2h_map) > 0
    _train(got, opt, windows, "cuda")
    for (name, a), b in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.gpu
def test_lora_recipe_with_adamw_offload_matches_adamw_on_cuda(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from recipes.lora_finetune import recipe_main

    monkeypatch.setenv("TINYTUNE_HOME", str(tmp_path / "home"))
    ckpt = make_tiny_checkpoint(str(tmp_path / "model"))
    chat = write_chat_jsonl(str(tmp_path / "chat.jsonl"))
    adapters = {}
    for name in ("adamw", "adamw_offload"):
        cfg = {
            "output_dir": str(tmp_path / name),
            "checkpoint_dir": ckpt,
            "device": "cuda",
            "dtype": "fp32",
            "seed": 0,
            "dataset": {
                "_component_": "tinytune.datasets.chat_dataset",
                "source": chat,
                "template": "chatml",
                "max_seq_len": 64,
            },
            "model": {"lora_attn_modules": ["q_proj", "v_proj"], "lora_rank": 64, "lora_alpha": 64.0},
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_steps": 4,
            "optimizer": {"name": name, "lr": 1e-3},
            "clip_grad_norm": CLIP,
            "metric_loggers": ["jsonl"],
        }
        recipe_main(OmegaConf.create(cfg))
        adapters[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    assert adapters["adamw"].keys() == adapters["adamw_offload"].keys()
    for key, want in adapters["adamw"].items():
        torch.testing.assert_close(adapters["adamw_offload"][key], want, atol=1e-5, rtol=1e-4, msg=key)
