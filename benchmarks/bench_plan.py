"""Checks ``tune plan``'s memory model against measured per-rank peaks on CPU/gloo.

For each layout the tests run (1 process; PP=2; PP=2 x FSDP=2; PP=2 x TP=2) the distributed
recipe trains a mid-size random Qwen3-shaped model (vocab 32,000, dim 512, 4 layers, fp32) for 3
steps. Every rank samples its anonymous resident memory (``RssAnon``: heap and anonymous mappings,
not the memory-mapped checkpoint file) every 2 ms in a background thread; the measured peak is
the highest value minus the value just before training started (after imports and the process
group). The prediction is :func:`tinytune.distributed.memory_plan.rank_memory` for the same workload
(fp32 compute and master weights, CPU's 256 MiB CE chunk budget, flash-style CPU attention).

    python benchmarks/bench_plan.py            # the four layouts, markdown table
    python benchmarks/bench_plan.py --smoke    # tiny model, 1 process (used by the tests)

Memory, not time, is measured, so a busy machine changes nothing but the run time (peaks shorter
than the 2 ms sampling period can be missed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYOUTS = {  # name: (processes, pp, dp_shard, tp)
    "single (1 process)": (1, 1, 1, 1),
    "pp2": (2, 2, 1, 1),
    "pp2 x fsdp2": (4, 2, 2, 1),
    "pp2 x tp2": (4, 2, 1, 2),
}
MODEL = {
    "vocab_size": 32000,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
}
SMOKE_MODEL = {
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
SEQ = 1024  # tokens per packed micro-batch (4 samples of 200-250 tokens)
ROWS = 4  # samples per micro-batch
ROW_LEN = 256  # with TP micro-batches stay padded rows: 4 x 256 tokens


def _anon_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.stop = 0, False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, _anon_bytes())
            time.sleep(0.002)


def write_checkpoint(out_dir: str, sizes: dict) -> str:
    import torch

    from tests._recipe_fixtures import make_tokenizer_files
    from tinytune.checkpoint import save_hf_checkpoint
    from tinytune.checkpoint.model_info import model_info_from_hf_config
    from tinytune.checkpoint.model_loading import build_model

    make_tokenizer_files(out_dir, vocab_size=320)
    cfg = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        **sizes,
    }
    info = model_info_from_hf_config(cfg)
    torch.manual_seed(0)
    model = build_model(info)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    save_hf_checkpoint(model, info, out_dir, tokenizer_dir=out_dir)
    return out_dir


def recipe_cfg(out: str, ckpt: str, pp: int, dp: int, tp: int, vocab: int, smoke: bool) -> dict:
    cfg = {
        "output_dir": out,
        "seed": 0,
        "device": "cpu",
        "dtype": "fp32",
        # the measurement fixes glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_ below) so freed buffers
        # leave the resident set; the recipes' own policy (auto = keep) would keep them in the heap
        "malloc": "default",
        "checkpoint_dir": ckpt,
        "plot_loss": False,
        "dataset": {
            "_component_": "tests.dist_workers.data.random_sft",
            "n": 64,
            "vocab": min(vocab, 1000),
            "min_len": 40 if smoke else 200,
            "max_len": 50 if smoke else 250,
        },
        "batch_size": ROWS * (2 if pp > 1 else 1),
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "lr_scheduler": {"name": "cosine", "warmup_steps": 1},
        "metric_loggers": ["jsonl"],
        "save_hf": False,
        "checkpoint_every_n_steps": 0,
        "resume_from_checkpoint": None,
        "parallelism": {"data_parallel_shard": dp, "tensor_parallel": tp},
    }
    if pp > 1:
        cfg["parallelism"].update(pipeline_parallel=pp, microbatches=2, pipeline_seq_len=SEQ if tp == 1 else ROW_LEN)
    return cfg


def worker(spec: dict) -> None:
    """One rank: baseline RssAnon, run the recipe, write the peak to ``spec['out']/mem_rank<r>.json``."""
    from omegaconf import OmegaConf

    from recipes.full_finetune_distributed import recipe_main
    from tinytune.distributed.mesh import init_distributed, shutdown_distributed

    info = init_distributed("cpu")
    import gc

    gc.collect()
    sampler = _Sampler()
    base = _anon_bytes()
    sampler.start()
    recipe_main(OmegaConf.create(spec["cfg"]))
    sampler.stop = True
    sampler.join()
    with open(os.path.join(spec["out"], f"mem_rank{info.rank}.json"), "w") as f:
        json.dump({"rank": info.rank, "peak": sampler.peak - base}, f)
    shutdown_distributed()


def predict(sizes: dict, pp: int, dp: int, tp: int):
    from tinytune.checkpoint.model_info import model_info_from_hf_config
    from tinytune.distributed.memory_plan import Layout, Workload, rank_memory
    from tinytune.kernels.linear_ce import CPU_MAX_CHUNK_ROWS

    info = model_info_from_hf_config(
        {
            "model_type": "qwen3",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1e4,
            "tie_word_embeddings": False,
            **sizes,
        }
    )
    rows, seq = (1, SEQ) if tp == 1 else (ROWS, ROW_LEN)  # packed row, or padded rows with TP
    work = Workload(
        rows=rows,
        seq_len=seq,
        microbatches=2,
        compute_dtype="fp32",
        master_dtype="fp32",
        ce_chunk_bytes=256 * 2**20,
        ce_chunk_rows=CPU_MAX_CHUNK_ROWS,  # the CPU runs' default cap (linear_ce)
        schedule="1f1b",
        load_on_device=True,
    )
    return rank_memory(info, Layout(pp=pp, dp_shard=dp, tp=tp), work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker")
    parser.add_argument("--layouts", nargs="*", help=f"a subset of {list(LAYOUTS)}")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    sizes = SMOKE_MODEL if args.smoke else MODEL
    layouts = {"single (1 process)": LAYOUTS["single (1 process)"]} if args.smoke else LAYOUTS
    if args.layouts:
        layouts = {k: v for k, v in layouts.items() if k in args.layouts}
    tmp = tempfile.mkdtemp(prefix="bench_plan_")
    ckpt = write_checkpoint(os.path.join(tmp, "ckpt"), sizes)
    print("| layout | ranks | predicted busiest rank (MiB) | measured busiest rank (MiB) | predicted / measured |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (n, pp, dp, tp) in layouts.items():
        out = os.path.join(tmp, name.replace(" ", "_").replace("(", "").replace(")", ""))
        os.makedirs(out)
        spec = {
            "out": out,
            "cfg": recipe_cfg(os.path.join(out, "run"), ckpt, pp, dp, tp, sizes["vocab_size"], args.smoke),
        }
        # fixed mmap threshold: large buffers are mapped and unmapped, so resident memory follows live tensors
        # (glibc's adaptive threshold would otherwise keep freed checkpoint buffers in the heap)
        env = dict(
            os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT, MALLOC_MMAP_THRESHOLD_="131072"
        )
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(n),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(29500 + os.getpid() % 1000 + n),
            __file__,
            "--worker",
            json.dumps(spec),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            print(f"| {name} | {n} | failed: {proc.stderr[-300:]!r} | | |")
            continue
        measured = max(json.load(open(os.path.join(out, f"mem_rank{r}.json")))["peak"] for r in range(n))
        plan = predict(sizes, pp, dp, tp)
        pred = plan["total"]
        print(
            f"| {name} | {n} | {pred / 2**20:.0f} ({plan['phase']}) | {measured / 2**20:.0f} | {pred / measured:.2f} |"
        )


if __name__ == "__main__":
    main()
