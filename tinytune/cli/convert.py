"""``tune convert``: checkpoint format conversions (GGUF -> HF safetensors directory)."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand (``tune convert gguf PATH OUT_DIR``)."""
    p = subparsers.add_parser(
        "convert",
        help="convert checkpoints between formats",
        description="Convert checkpoints: gguf (llama architecture) -> HF safetensors directory; hf-to-gguf: HF directory -> GGUF.",
    )
    sub = p.add_subparsers(dest="format", metavar="<format>")
    g = sub.add_parser(
        "gguf",
        help="llama-architecture GGUF -> HF checkpoint directory",
        description=(
            "Dequantize every tensor of a llama-architecture GGUF (F32/F16/BF16/Q4_0/Q4_1/Q8_0/K-quants), "
            "undo llama.cpp's q/k row permutation and write an HF checkpoint directory (safetensors, "
            "config.json, generation_config.json, tokenizer files and chat template)."
        ),
    )
    g.add_argument("path", help="input .gguf file")
    g.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    g.add_argument("--dtype", default="bf16", help="dtype of the written weights: bf16 (default), fp16, fp32")
    g.add_argument("--max-shard-size", default="5GB", help="safetensors shard size, e.g. 2GB (default 5GB)")
    g.add_argument("--no-tokenizer", action="store_true", help="write weights and config only")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    g.set_defaults(func=run_gguf)
    h = sub.add_parser(
        "hf-to-gguf",
        help="HF checkpoint directory -> GGUF file (llama.cpp, Ollama)",
        description=(
            "Write an HF checkpoint directory (Llama 2/3, Qwen2/2.5/3, SmolLM2; e.g. a fine-tune's hf_model/) as one "
            "GGUF file with the tokenizer and chat template in its metadata. Norms and biases stay F32; --type sets "
            "the 2-D weights."
        ),
    )
    h.add_argument("hf_dir", help="input HF checkpoint directory (config.json, safetensors, tokenizer files)")
    h.add_argument("out", help="output .gguf file")
    h.add_argument("--type", default="f16", help="f16 (default), bf16, q8_0 or f32")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    h.set_defaults(func=run_hf_to_gguf)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_gguf(args: argparse.Namespace) -> int:
    """Convert; print where the checkpoint went. Returns the exit status."""
    from tinytune.checkpoint.gguf_convert import convert_gguf_to_hf  # noqa: PLC0415
    from tinytune.checkpoint.model_info import CheckpointError  # noqa: PLC0415
    from tinytune.checkpoint.model_loading import resolve_dtype  # noqa: PLC0415

    if os.path.exists(args.out_dir) and not args.overwrite:
        print(f"tune convert: error: {args.out_dir} exists; pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        out, info = convert_gguf_to_hf(
            args.path,
            args.out_dir,
            dtype=resolve_dtype(args.dtype),
            max_shard_size=args.max_shard_size,
            tokenizer=not args.no_tokenizer,
            overwrite=args.overwrite,
        )
    except (CheckpointError, ValueError, OSError) as e:
        print(f"tune convert: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {info.model_type} checkpoint ({info.num_layers} layers, dim {info.dim}) to {out}")
    return 0


def run_hf_to_gguf(args: argparse.Namespace) -> int:
    """Write the GGUF; print where it went. Returns the exit status."""
    from tinytune.checkpoint.gguf_writer import check_gguf_type, convert_hf_to_gguf  # noqa: PLC0415
    from tinytune.checkpoint.model_info import CheckpointError  # noqa: PLC0415

    try:
        out_type = check_gguf_type(args.type, "--type")
        if os.path.exists(args.out) and not args.overwrite:
            raise CheckpointError(f"{args.out} exists; pass --overwrite to replace it")
        path = convert_hf_to_gguf(args.hf_dir, args.out, out_type)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"tune convert: error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {out_type} GGUF to {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0
