"""``tune prepare-data``: tokenize a config's datasets into the token cache ahead of training."""

from __future__ import annotations

import argparse
import os
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prepare-data`` subcommand."""
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenize a config's datasets into the token cache",
        description=(
            "Build the config's tokenizer and instantiate `dataset` (and `validation.dataset` when present). "
            "The dataset builders tokenize with worker processes into a memory-mapped token cache keyed by "
            "the data, the tokenizer, the template and the options, so training starts without re-tokenizing."
        ),
    )
    p.add_argument("--config", required=True, help="config name (e.g. smollm2/135M_lora) or YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="tokenizer processes (default: the config's num_workers, else min(4, CPUs))",
    )
    p.add_argument(
        "--show",
        type=int,
        default=None,
        metavar="N",
        help="print N rendered samples with the trained tokens marked, then the dataset statistics "
        "(rows, dropped/truncated by reason, tokens, trained fraction, length histogram, unused "
        "columns)",
    )
    p.add_argument("--tokens", action="store_true", help="with --show: put | between tokens")
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="with --show: mark trained tokens in colour (auto: on a terminal) or with [[...]]",
    )
    p.set_defaults(func=run)


def _tokenizer(cfg):
    from tinytune.tokenizers import load_tokenizer

    path = cfg.get("tokenizer", {}).get("path") if cfg.get("tokenizer") is not None else None
    if not path:
        from tinytune.config.recipe_settings import ModelSourceSettings
        from tinytune.training.setup import resolve_checkpoint_dir

        src = ModelSourceSettings(checkpoint_dir=cfg.get("checkpoint_dir"), bundled_model=cfg.get("bundled_model"))
        path = resolve_checkpoint_dir(src)
    return load_tokenizer(os.path.expanduser(str(path)))


def _meta(ds) -> dict:
    while not hasattr(ds, "meta") and hasattr(ds, "dataset"):
        ds = ds.dataset
    return getattr(ds, "meta", {})


def run(args: argparse.Namespace) -> int:
    """Builds (or finds) the token caches and prints what they hold."""
    from omegaconf import open_dict

    from tinytune import config as tt_config
    from tinytune.datasets import DatasetError, TemplateError
    from tinytune.datasets.show import show_dataset

    cfg = tt_config.load_config(args.config, args.overrides)
    nodes = [("dataset", cfg.get("dataset"))]
    val = cfg.get("validation")
    if val is not None and val.get("dataset") is not None:
        nodes.append(("validation.dataset", val.get("dataset")))
    if nodes[0][1] is None:
        print(f"tune prepare-data: error: {args.config} has no `dataset` section", file=sys.stderr)
        return 2
    tokenizer = _tokenizer(cfg)
    for where, node in nodes:
        if "_component_" not in node:
            print(
                f"tune prepare-data: error: {where} needs a _component_ (e.g. tinytune.datasets.sft_dataset)",
                file=sys.stderr,
            )
            return 2
        if args.num_workers is not None:
            with open_dict(node):
                node.num_workers = args.num_workers
        t0 = time.time()
        try:
            ds = tt_config.instantiate(node, tokenizer=tokenizer)
        except (DatasetError, TemplateError) as e:
            print(f"tune prepare-data: {where}: error: {e}", file=sys.stderr)
            return 1
        m = _meta(ds)
        hit = getattr(ds, "cache_hit", False)
        print(f"{where}: {len(ds)} items ({'cache hit' if hit else 'tokenized'} in {time.time() - t0:.1f}s)")
        if m:
            print(
                f"  rows {m.get('rows')}, sequences {m.get('sequences')}, tokens {m.get('tokens')}, "
                f"trained tokens {m.get('trained_tokens')}"
            )
            dropped = ", ".join(f"{k} {v}" for k, v in sorted((m.get("dropped") or {}).items())) or "none"
            truncated = ", ".join(f"{k} {v}" for k, v in sorted((m.get("truncated") or {}).items())) or "none"
            print(f"  skipped bad rows {m.get('skipped_bad', 0)}, dropped {dropped}, truncated {truncated}")
            if m.get("unused_columns"):
                print(f"  columns not used by the style: {', '.join(sorted(m['unused_columns']))}")
            if not hit:
                print(f"  built in {m.get('build_seconds')}s with {m.get('num_workers')} worker(s)")
        cache = getattr(
            getattr(ds, "cache", None) or getattr(getattr(ds, "dataset", None), "cache", None), "path", None
        )
        if cache:
            print(f"  cache: {cache}")
        if args.show is not None:
            color = {"always": True, "never": False}.get(args.color)
            show_dataset(ds, tokenizer, args.show, color=color, show_tokens=args.tokens, name=where)
    return 0
