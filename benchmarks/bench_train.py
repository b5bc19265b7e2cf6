"""Training-step throughput and peak memory: tinytune vs HF transformers (+PEFT) vs torchtune.

One training step = forward + loss + backward + AdamW step + zero_grad, on the same batch, the
same weights (the bundled SmolLM2-135M-Instruct conversion, or a random init of the same shape
written once to an HF directory that every side loads), the same dtype, the same optimizer
settings and the same LoRA targets/rank. Every (framework, mode, packing) configuration runs in a
fresh process; rounds are interleaved (A B C A B C ...) and the step times of all rounds pooled.

Reported per configuration: label tokens/s (median step), the step's median wall time and CPU
time (user+sys of all the process's threads: less sensitive to other jobs on a shared machine), the first
timed step's loss (a cross-check that all sides compute the same thing), peak RSS of the process
(CPU; ``torch.cuda.max_memory_allocated`` on GPU) and the peak growth during training
("train delta" = high-water mark after the steps minus the RSS right before the first step).

    python benchmarks/bench_train.py                       # full + LoRA, unpacked + packed, fp32
    python benchmarks/bench_train.py --mode lora --packed  # LoRA on packed rows only
    python benchmarks/bench_train.py --dtype bf16 --steps 5 --rounds 3
    python benchmarks/bench_train.py --dtype bf16_mixed  # tinytune mixed precision vs the peers' bf16
    python benchmarks/bench_train.py --smoke               # tiny model, seconds (used by the tests)
    python benchmarks/bench_train.py --mode lora --qlora   # QLoRA: NF4 base (torchao) vs torchtune's QLoRA

``--qlora`` keeps the frozen base weights of the adapted projections in torchao NF4 on both
tinytune and torchtune. HF+PEFT is left out: its QLoRA goes through bitsandbytes ``Linear4bit``, a
dependency this benchmark does not install (newer bitsandbytes releases have a CPU backend; not
compared here).

``--dtype bf16`` runs every side in bf16 as that library does it: tinytune and torchtune cast the
whole model (pure bf16), HF loads it in bf16 and PEFT keeps LoRA adapters in fp32 (its default
``autocast_adapter_dtype=True``). ``--dtype bf16_mixed`` changes only tinytune, to its
``mixed_precision: true`` mode (fp32 trainable weights and AdamW state, bf16 autocast); the table's
last line prints each side's trainable-weight dtype.

torchtune runs with ``--torchtune-python`` (default ``/work/bench-venv/bin/python`` when it
exists): a separate virtual environment, so peers never become tinytune dependencies.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    current_rss_mib,
    emit_result,
    fmt,
    machine_line,
    make_batch,
    median,
    peak_rss_mib,
    print_table,
    run_worker,
    seq_lens_tensor,
)
from _flops import gemm_peak_flops, step_flops  # noqa: E402

FRAMEWORKS = ("tinytune", "hf", "torchtune")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TORCHTUNE_PYTHON = "/work/bench-venv/bin/python"
SMOKE_SHAPE = dict(vocab_size=256, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_dim=160)
SMOLLM2_135M_SHAPE = dict(
    vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_dim=1536
)

# ================================================================================ worker side


def _torch_setup(spec: dict):
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    # bf16_mixed: tinytune's mixed precision; the peers run their own bf16 mode (see _build_hf/_build_torchtune)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16_mixed": torch.bfloat16}
    return torch, dtypes[spec["dtype"]], torch.device(spec["device"])


def _adamw(torch, params, spec):
    o = spec["optim"]
    kwargs = {}
    if o.get("fused") is not None:
        kwargs["fused"] = bool(o["fused"])
    return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"], betas=(0.9, 0.999), eps=1e-8, **kwargs)


def _build_tinytune(spec, torch, dtype, device):
    """tinytune: checkpoint loader + LoRA factory, the recipe's loss/step functions.

    ``bf16_mixed``: the recipes' ``mixed_precision: true`` (fp32 trainable weights and AdamW state,
    frozen weights in bf16, forward under bf16 autocast).
    """
    from tinytune.checkpoint import load_hf_model
    from tinytune.modules.peft import lora_linear_factory, set_trainable_params
    from tinytune.training import Precision, sft_loss, to_device
    from tinytune.training.padding_free import drop_unlabeled_tail
    from tinytune.training.steps import optimizer_step, sft_accumulate

    precision = Precision.from_settings(spec["dtype"] == "bf16_mixed", dtype, device)
    if spec.get("compile"):  # the recipes' hardware.compile: compiled RMSNorm / SwiGLU / RoPE bodies
        from tinytune.kernels.compiled_ops import set_compiled

        set_compiled(True)
    factory = None
    if spec["mode"] == "lora":
        factory = lora_linear_factory(
            LORA_TARGETS, rank=spec["rank"], alpha=spec["alpha"], dropout=0.0, **_qlora_kwargs(spec)
        )
    frozen = precision.frozen_dtype if spec["mode"] == "lora" else None  # the LoRA recipe's load
    model, _ = load_hf_model(
        spec["weights"], dtype=precision.load_dtype, device=device, linear_factory=factory, frozen_dtype=frozen
    )
    if spec["mode"] == "lora":
        set_trainable_params(model)
    precision.cast_frozen(model)
    model.train()
    optimizer = _adamw(torch, [p for p in model.parameters() if p.requires_grad], spec)

    def make_step(batch):
        mb = {"tokens": batch.tokens, "labels": batch.labels}
        if batch.packed:
            mb.update(input_pos=batch.input_pos, seq_lens=seq_lens_tensor(batch))

        def step():
            if not precision.mixed:
                loss, _ = sft_accumulate(model, [mb], device, padding_free=spec.get("padding_free", True))
            else:  # the recipes' micro-step: forward under autocast, backward outside it
                m = drop_unlabeled_tail(mb) if spec.get("padding_free", True) else mb
                with precision.autocast():
                    loss = sft_loss(model, to_device(m, device))
                loss.backward()
                loss = loss.detach()
            optimizer_step(model, optimizer)
            return loss

        return step

    return model, make_step


def _build_hf(spec, torch, dtype, device):
    """HF transformers (+ PEFT for LoRA), SDPA attention, the model's own loss (logits + CE)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["weights"], dtype=dtype, attn_implementation="sdpa").to(device)
    model.config.use_cache = False
    if spec["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=spec["rank"],
            lora_alpha=spec["alpha"],
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, cfg)
    model.train()
    if spec.get("compile_peers"):  # regional: every decoder layer compiled (same code: compiled once)
        for layer in model.get_base_model().model.layers if spec["mode"] == "lora" else model.model.layers:
            layer.compile()
    optimizer = _adamw(torch, [p for p in model.parameters() if p.requires_grad], spec)

    def make_step(batch):
        tokens, labels = batch.tokens.to(device), batch.labels.to(device)
        # Packed rows: position_ids restarting per document make transformers build a block-diagonal mask.
        pos = batch.input_pos.to(device) if batch.packed else None

        def step():
            # labels are pre-shifted: pass them as shift_labels so HF does not shift again
            out = model(input_ids=tokens, position_ids=pos, labels=labels, shift_labels=labels, use_cache=False)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.detach()

        return step

    return model, make_step


def _build_torchtune(spec, torch, dtype, device):
    """torchtune 0.6: llama3_2 builders (tied output) with plain RoPE, chunked-output CE loss."""
    import importlib

    try:  # torchtune 0.6.1 imports NF4 from torchao's pre-0.10 path; point it at the new module
        import torchao.dtypes.nf4tensor  # noqa: F401
    except ImportError:
        sys.modules["torchao.dtypes.nf4tensor"] = importlib.import_module(
            "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"
        )
    from safetensors.torch import load_file
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
    from torchtune.modules import RotaryPositionalEmbeddings
    from torchtune.modules.attention_utils import packed_block_causal_mask
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    if spec.get("quantize_base"):
        _torchtune_nf4_block_sizes()
    with open(os.path.join(spec["weights"], "config.json")) as f:
        cfg = json.load(f)
    shape = dict(
        vocab_size=cfg["vocab_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg["num_key_value_heads"],
        embed_dim=cfg["hidden_size"],
        max_seq_len=cfg["max_position_embeddings"],
        intermediate_dim=cfg["intermediate_size"],
        norm_eps=cfg["rms_norm_eps"],
        rope_base=cfg["rope_theta"],
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    with torch.device(device):
        if spec["mode"] == "lora":
            model = lora_llama3_2(
                ["q_proj", "k_proj", "v_proj", "output_proj"],
                apply_lora_to_mlp=True,
                lora_rank=spec["rank"],
                lora_alpha=spec["alpha"],
                lora_dropout=0.0,
                **_qlora_kwargs(spec),
                **shape,
            )
        else:
            model = llama3_2(**shape)
        # SmolLM2 uses unscaled RoPE; llama3_2 builds Llama 3 scaled RoPE: swap in the plain one.
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        rope = RotaryPositionalEmbeddings(head_dim, max_seq_len=shape["max_seq_len"], base=shape["rope_base"])
    for layer in model.layers:
        layer.attn.pos_embeddings = rope
    sd = hf_to_tune(
        load_file(os.path.join(spec["weights"], "model.safetensors")),
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        dim=shape["embed_dim"],
    )
    sd.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if "lora" not in k] + list(unexpected)
    if bad:
        raise RuntimeError(f"torchtune load: unexpected/missing keys {bad[:5]}")
    model.to(dtype=dtype)
    if spec["mode"] == "lora":
        set_trainable_params(model, get_adapter_params(model))
    model.train()
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    if spec.get("compile_peers"):
        # What torchtune's compile: True does (training.compile_model / compile_loss), written out:
        # its torchtune.training package does not import against torchao 0.18.
        from torchtune.modules import TransformerSelfAttentionLayer

        for m in model.modules():
            if isinstance(m, TransformerSelfAttentionLayer):
                m.compile()
        loss_fn.compute_cross_entropy = torch.compile(loss_fn.compute_cross_entropy)
    optimizer = _adamw(torch, [p for p in model.parameters() if p.requires_grad], spec)

    def make_step(batch):
        tokens, labels = batch.tokens.to(device), batch.labels.to(device)
        mask = input_pos = None
        if batch.packed:
            mask = packed_block_causal_mask([torch.tensor(x, device=device) for x in batch.seq_lens])  # [b, s, s]
            input_pos = batch.input_pos.to(device)

        def step():
            logits = model(tokens, mask=mask, input_pos=input_pos)  # list of output chunks
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return model, make_step


def _torchtune_nf4_block_sizes() -> None:
    """Lets torchtune's ``LoRALinear`` quantize every SmolLM2 projection to NF4.

    torchtune calls torchao's ``to_nf4`` with its defaults (blocks of 64, scaler blocks of 256),
    which needs ``numel / 64`` divisible by 256; SmolLM2's 576 x 576 and 192 x 576 projections are
    not (5,184 and 1,728 blocks). Both sides then use the same rule tinytune uses: blocks of 64 and
    the largest scaler block (256, 128, 64, ...) that divides the block count. Nothing else changes.
    """
    import torchtune.modules.peft.lora as tt_lora

    original = tt_lora.to_nf4

    def to_nf4(tensor, block_size: int = 64, scaler_block_size: int = 256):
        n_blocks = tensor.numel() // block_size
        while scaler_block_size > 1 and n_blocks % scaler_block_size:
            scaler_block_size //= 2
        return original(tensor, block_size=block_size, scaler_block_size=scaler_block_size)

    tt_lora.to_nf4 = to_nf4


def _qlora_kwargs(spec: dict) -> dict:
    """``{"quantize_base": True}`` for a QLoRA run (``--qlora``), else nothing (both libraries' keyword)."""
    return {"quantize_base": True} if spec.get("quantize_base") else {}


def worker_main(spec: dict) -> None:
    """Runs one configuration: build, warm up, time ``steps`` steps, report."""
    if importlib.util.find_spec("tinytune") is None:  # the torchtune venv: tinytune from this checkout
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tinytune.training.host_malloc import apply_malloc_policy

    # tinytune: what its recipes do (hardware.malloc, default keep); the peers: --malloc-peers
    policy = spec.get("malloc", "keep") if spec["framework"] == "tinytune" else spec.get("malloc_peers", "default")
    malloc = apply_malloc_policy(policy)
    if spec["framework"] == "tinytune":
        from tinytune.kernels.cpu_gemm import set_cpu_gemm

        set_cpu_gemm(spec.get("cpu_gemm", "auto"))
    torch, dtype, device = _torch_setup(spec)
    batch = make_batch(spec["bs"], spec["seq"], spec["vocab"], spec["packed"], seed=spec.get("seed", 0))
    build = {"tinytune": _build_tinytune, "hf": _build_hf, "torchtune": _build_torchtune}[spec["framework"]]
    model, make_step = build(spec, torch, dtype, device)
    # Warm-up on a small batch of the same kind (optimizer state creation, thread pools, first-call
    # overheads); the timed steps and the memory high-water mark then come from the real batch.
    small = make_batch(1, min(128, spec["seq"]), spec["vocab"], spec["packed"], seed=1)
    warm_step, step = make_step(small), make_step(batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(spec["warmup"]):
        warm_step()
    sync()
    rss_before = current_rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times, cpu_times = [], [], []
    for _ in range(spec["steps"]):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # all threads of this process: robust to other load
        losses.append(float(loss))
    if spec["framework"] == "tinytune":
        flops = _tinytune_flops(spec, batch)
        peak = gemm_peak_flops(torch, dtype)  # same process, same threads, after the timed steps
    result = {
        "framework": spec["framework"],
        "mode": spec["mode"],
        "packed": spec["packed"],
        "times": times,
        "cpu_times": cpu_times,
        "first_loss": losses[0],
        "label_tokens": batch.label_tokens,
        "trainable": trainable,
        "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad}),
        "peak_rss_mib": peak_rss_mib(),
        "rss_before_mib": rss_before,
        "malloc": malloc,
    }
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if spec["framework"] == "tinytune":
        result.update(flops=flops, gemm_peak=peak)
    emit_result(result)


def _tinytune_flops(spec: dict, batch) -> dict:
    """Model FLOPs of one step on ``batch`` as the tinytune side computes it (padding-free or not)."""
    from tinytune.training.padding_free import drop_unlabeled_tail

    mb = {"tokens": batch.tokens, "labels": batch.labels}
    if batch.packed:
        mb.update(input_pos=batch.input_pos, seq_lens=seq_lens_tensor(batch))
    if spec.get("padding_free", True):
        mb = drop_unlabeled_tail(mb)
    if "seq_lens" in mb:
        docs = [n for row in mb["seq_lens"].tolist() for n in row if n > 0]
    else:
        docs = [mb["tokens"].shape[1]] * mb["tokens"].shape[0]
    shape = spec["shape"]
    labels = int((mb["labels"] != -100).sum())
    return step_flops(shape, docs, labels, spec["mode"], spec["rank"], LORA_TARGETS)


# ================================================================================ parent side


def prepare_weights(args) -> tuple[str, str]:
    """Returns ``(hf_dir, description)``: bundled weights, or random weights of the same shape."""
    if args.weights == "bundled" and not args.smoke:
        try:
            from tinytune.checkpoint import ensure_smollm2

            return ensure_smollm2(), "bundled SmolLM2-135M-Instruct (GGUF Q4_1 -> HF conversion)"
        except Exception as e:  # noqa: BLE001 - fall back to random weights of the same shape
            print(f"bundled weights unavailable ({e}); using a random init of the same shape", file=sys.stderr)
    elif args.weights not in ("bundled", "random"):
        return os.path.abspath(args.weights), f"HF checkpoint {args.weights}"
    import torch

    from tinytune.checkpoint import ModelInfo, build_model, save_hf_checkpoint
    from tinytune.checkpoint.model_info import hf_config_from_model_info

    shape = SMOKE_SHAPE if args.smoke else SMOLLM2_135M_SHAPE
    info = ModelInfo(
        model_type="llama", norm_eps=1e-5, rope_base=100_000.0, max_seq_len=8192, tie_word_embeddings=True, **shape
    )
    info.hf_config = hf_config_from_model_info(info)
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="tinytune_bench_weights_")
    atexit.register(shutil.rmtree, out, True)
    save_hf_checkpoint(build_model(info), info, out)
    what = "tiny random model (smoke)" if args.smoke else "random init, SmolLM2-135M shape"
    return out, what


def _row_label(mode: str, packed: bool, qlora: bool = False) -> str:
    return f"{'qlora' if qlora and mode == 'lora' else mode} {'packed' if packed else 'unpacked'}"


def _qlora_setup(args, frameworks: list[str], notes: list[str]) -> dict:
    """``--qlora``: LoRA configs with NF4 bases; HF+PEFT dropped (its QLoRA needs bitsandbytes, not used here)."""
    if not args.qlora:
        return {}
    if args.mode != "lora":
        raise SystemExit("--qlora needs --mode lora (QLoRA quantizes the frozen base of LoRA runs)")
    if "hf" in frameworks:
        frameworks.remove("hf")
        notes.append("hf skipped with --qlora: HF+PEFT QLoRA needs bitsandbytes 4-bit layers (not installed here)")
    return {"quantize_base": True}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["full", "lora", "both"], default="both")
    p.add_argument("--packed", action="store_true", help="only packed rows (default: unpacked and packed)")
    p.add_argument("--unpacked", action="store_true", help="only unpacked rows")
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps on a 1 x 128 batch first")
    p.add_argument("--rounds", type=int, default=2, help="interleaved fresh-process rounds per configuration")
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "bf16_mixed"],
        default="fp32",
        help="bf16_mixed: tinytune with mixed_precision (fp32 trainable weights + AdamW state, bf16\n"
        "autocast); HF+PEFT and torchtune run their own bf16 mode, as with bf16",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--frameworks", default="tinytune,hf,torchtune")
    p.add_argument("--torchtune-python", default=DEFAULT_TORCHTUNE_PYTHON)
    p.add_argument("--weights", default="bundled", help="bundled | random | PATH to an HF checkpoint dir")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument(
        "--fused-adamw",
        choices=["default", "on", "off"],
        default="on",
        help="AdamW fused=True/False on every side (on: the HF Trainer and torchtune default)",
    )
    p.add_argument(
        "--padding-free",
        choices=["on", "off"],
        default="on",
        help="tinytune: drop positions after each row's last label (the recipes' default: on);\n"
        "off trains on the padded batch as the peers do",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads in workers (0: PyTorch default). Use 1 on a machine shared with\n"
        "other jobs: multi-threaded GEMMs then wait for descheduled OpenMP threads",
    )
    p.add_argument(
        "--qlora",
        action="store_true",
        help="LoRA with the frozen base in NF4 (torchao) on tinytune and torchtune (needs --mode lora)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="tinytune with hardware.compile: true (compiled elementwise bodies; compiled in the warm-up step)",
    )
    p.add_argument(
        "--compile-peers",
        action="store_true",
        help="HF: every decoder layer torch.compile'd; torchtune: compile_model + compile_loss (its compile: True)",
    )
    p.add_argument(
        "--malloc",
        choices=("keep", "release", "default"),
        default="keep",
        help="tinytune's host allocator policy (the recipes' hardware.malloc; default keep, as in the recipes)",
    )
    p.add_argument(
        "--malloc-peers",
        choices=("keep", "release", "default"),
        default="default",
        help="the same policy applied to the peers' processes (default: their C library's default)",
    )
    p.add_argument(
        "--cpu-gemm",
        choices=("auto", "torch", "onednn", "onednn_fast"),
        default="auto",
        help="tinytune's fp32 CPU GEMM back end (the recipes' cpu_gemm; default auto, as in the recipes)",
    )
    p.add_argument("--json", help="also write all raw results to this file")
    p.add_argument("--smoke", action="store_true", help="tiny model, bs 2, seq 64, 1 step, 1 round")
    args = p.parse_args(argv)

    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    if args.smoke:
        args.bs, args.seq, args.steps, args.warmup, args.rounds = 2, 64, 1, 1, 1
        args.threads = args.threads or 1  # tiny ops: OpenMP barriers dominate on a busy machine

    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    for f in frameworks:
        if f not in FRAMEWORKS:
            p.error(f"--frameworks: unknown {f!r}; choose from {FRAMEWORKS}")
    pythons = {f: sys.executable for f in frameworks}
    notes = []
    if "torchtune" in frameworks:
        if os.path.exists(args.torchtune_python):
            pythons["torchtune"] = args.torchtune_python
        else:
            frameworks.remove("torchtune")
            notes.append(f"torchtune skipped: {args.torchtune_python} not found (see benchmarks/RESULTS.md)")

    qlora = _qlora_setup(args, frameworks, notes)
    weights, weights_desc = prepare_weights(args)
    with open(os.path.join(weights, "config.json")) as f:
        hf_config = json.load(f)
    vocab = hf_config["vocab_size"]
    heads = hf_config["num_attention_heads"]
    shape = dict(
        dim=hf_config["hidden_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf_config.get("num_key_value_heads", heads),
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
        hidden_dim=hf_config["intermediate_size"],
        vocab_size=vocab,
    )
    modes = ["full", "lora"] if args.mode == "both" else [args.mode]
    packings = [True] if args.packed else [False] if args.unpacked else [False, True]
    fused = {"default": None, "on": True, "off": False}[args.fused_adamw]
    base = dict(
        bs=args.bs,
        seq=args.seq,
        vocab=vocab,
        shape=shape,
        dtype=args.dtype,
        device=args.device,
        weights=weights,
        steps=args.steps,
        warmup=args.warmup,
        rank=args.rank,
        alpha=args.alpha,
        threads=args.threads,
        padding_free=args.padding_free == "on",
        compile=args.compile,
        compile_peers=args.compile_peers,
        malloc=args.malloc,
        cpu_gemm=args.cpu_gemm,
        malloc_peers=args.malloc_peers,
        optim={"lr": args.lr, "weight_decay": 0.01, "fused": fused},
        **qlora,
    )

    print(f"# bench_train: {machine_line()}")
    print(
        f"# weights: {weights_desc}; bs {args.bs} x seq {args.seq}, {args.dtype} on {args.device}, "
        f"threads {args.threads or 'default'}; tinytune padding-free {args.padding_free}; "
        f"AdamW lr {args.lr} wd 0.01; {'QLoRA (NF4 base)' if qlora else 'LoRA'} r={args.rank} alpha={args.alpha} "
        f"on {','.join(LORA_TARGETS)}; "
        f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds per config"
        f"{'; tinytune compile: true' if args.compile else ''}{'; peers compiled' if args.compile_peers else ''}"
        f"; malloc tinytune {args.malloc}, peers {args.malloc_peers}; tinytune cpu_gemm {args.cpu_gemm}",
        flush=True,
    )
    results: dict[tuple, list[dict]] = {}
    script = os.path.abspath(__file__)
    for rnd in range(args.rounds):
        for mode in modes:
            for packed in packings:
                for fw in frameworks:
                    spec = dict(base, framework=fw, mode=mode, packed=packed)
                    res = run_worker(pythons[fw], script, spec, timeout=3600)
                    results.setdefault((mode, packed, fw), []).append(res)
                    status = res.get("error") or f"median {median(res['times']):.3f}s/step"
                    print(
                        f"  round {rnd + 1}: {fw:9s} {_row_label(mode, packed, bool(qlora)):14s} {status}", flush=True
                    )

    gpu = args.device.startswith("cuda")
    headers = [
        "config",
        "framework",
        "tok/s",
        "s/step",
        "CPU s/step",
        "loss@1",
        "trainable",
        "peak GPU MiB" if gpu else "peak RSS MiB",
        "train delta MiB",
        "tok/s ours/theirs",
        "CPU-s theirs/ours",
        "peak ours/theirs",
        "MFU",
    ]
    rows, summary, mfu_notes = [], {}, []
    for mode in modes:
        for packed in packings:
            agg = {}
            for fw in frameworks:
                runs = [r for r in results[(mode, packed, fw)] if "error" not in r]
                if not runs:
                    agg[fw] = {"error": results[(mode, packed, fw)][0]["error"]}
                    continue
                times = [t for r in runs for t in r["times"]]
                t = median(times)
                cpu = median([c for r in runs for c in r.get("cpu_times", [])])
                peak = median([r["peak_gpu_mib" if gpu else "peak_rss_mib"] for r in runs])
                delta = median([r["peak_rss_mib"] - r["rss_before_mib"] for r in runs]) if not gpu else float("nan")
                agg[fw] = dict(
                    tps=runs[0]["label_tokens"] / t,
                    t=t,
                    cpu=cpu,
                    loss=runs[0]["first_loss"],
                    peak=peak,
                    delta=delta,
                    trainable=runs[0]["trainable"],
                )
                if "flops" in runs[0]:
                    gemm_peak = max(r["gemm_peak"] for r in runs)
                    flops = runs[0]["flops"]
                    agg[fw].update(gflop=flops["total"] / 1e9, mfu=flops["total"] / t / gemm_peak)
                    mfu_notes.append(
                        f"{_row_label(mode, packed, bool(qlora))}: {flops['total'] / 1e9:.1f} GFLOP/step (linear "
                        f"{flops['linear'] / 1e9:.1f}, attention {flops['attention'] / 1e9:.1f}, CE "
                        f"{flops['ce'] / 1e9:.1f}); GEMM peak {gemm_peak / 1e9:.1f} GFLOP/s; "
                        f"{flops['total'] / t / 1e9:.1f} GFLOP/s achieved = {100 * flops['total'] / t / gemm_peak:.1f}% "
                        "of the GEMM-bound limit"
                    )
            ours = agg.get("tinytune", {})
            for fw in frameworks:
                a = agg[fw]
                if "error" in a:
                    rows.append([_row_label(mode, packed, bool(qlora)), fw, "error"] + ["-"] * 10)
                    notes.append(f"{fw} {_row_label(mode, packed, bool(qlora))}: {a['error']}")
                    continue
                ratio_t = ratio_c = ratio_m = "-"
                if fw != "tinytune" and "tps" in ours:
                    ratio_t = f"{ours['tps'] / a['tps']:.2f}x"
                    ratio_c = f"{a['cpu'] / ours['cpu']:.2f}x"
                    ratio_m = f"{ours['peak'] / a['peak']:.2f}x"
                    summary[(mode, packed, fw)] = (ours["tps"] / a["tps"], ours["peak"] / a["peak"])
                rows.append(
                    [
                        _row_label(mode, packed, bool(qlora)),
                        fw,
                        fmt(a["tps"], ".0f"),
                        fmt(a["t"], ".3f"),
                        fmt(a["cpu"], ".2f"),
                        fmt(a["loss"], ".4f"),
                        f"{a['trainable'] / 1e6:.2f}M",
                        fmt(a["peak"], ".0f"),
                        fmt(a["delta"], ".0f"),
                        ratio_t,
                        ratio_c,
                        ratio_m,
                        f"{100 * a['mfu']:.1f}%" if "mfu" in a else "-",
                    ]
                )
    print()
    print_table(headers, rows)
    for n in mfu_notes:
        print(f"MFU (tinytune, model FLOPs as computed / measured {args.dtype} GEMM peak): {n}")
    dtypes = {}
    for (mode, _, fw), runs in results.items():
        for r in runs:
            if "trainable_dtypes" in r:
                dtypes[(fw, mode)] = "/".join(r["trainable_dtypes"])
    print(
        "trainable weights (and AdamW state) dtype: "
        + "; ".join(f"{fw} {mode} {d}" for (fw, mode), d in dtypes.items())
    )
    for n in notes:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "machine": machine_line(),
                    "weights": weights_desc,
                    "results": [{"key": list(k), "runs": v} for k, v in results.items()],
                },
                f,
                indent=1,
            )
    return 0 if all("error" not in r for v in results.values() for r in v) else 1


if __name__ == "__main__":
    sys.exit(main())
