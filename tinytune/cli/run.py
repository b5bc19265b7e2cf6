"""``tune run``: run a recipe in this process, or through torchrun for several processes.

``tune run RECIPE --config CFG [key=value ...]`` runs the recipe script in-process (runpy, with
``sys.argv`` set as if it were started directly). Launcher flags placed *before* the recipe
(``--nproc_per_node 2``, ``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``, ``--master_port``,
...) start it through ``torch.distributed.run`` (torchrun) instead. RECIPE and CFG are registry
names (see ``tune ls``) or paths.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from tinytune.config import registry
from tinytune.errors import show_traceback

# torchrun options forwarded as-is: (dest, takes a value)
LAUNCHER_FLAGS = (
    ("nproc_per_node", True),
    ("nnodes", True),
    ("node_rank", True),
    ("rdzv_endpoint", True),
    ("rdzv_backend", True),
    ("rdzv_id", True),
    ("master_addr", True),
    ("master_port", True),
    ("max_restarts", True),
    ("standalone", False),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand."""
    p = subparsers.add_parser(
        "run",
        help="run a recipe (in-process, or with torchrun flags distributed)",
        description=(
            "Run RECIPE (a name from `tune ls` or a path) with --config CFG (a name or a path) and "
            "key=value overrides, in this process. torchrun flags placed before RECIPE "
            "(--nproc_per_node 2, --nnodes, --node_rank, --rdzv_endpoint, --master_port, ...) launch "
            "it through torch.distributed.run instead."
        ),
        allow_abbrev=False,
        epilog="Example: tune run --nproc_per_node 2 lora_finetune --config smollm2/135M_lora max_steps=10",
    )
    launcher = p.add_argument_group("torchrun flags (before RECIPE; any of them launches via torchrun)")
    for dest, takes_value in LAUNCHER_FLAGS:
        names = [f"--{dest}"] + ([f"--{dest.replace('_', '-')}"] if "_" in dest else [])
        if takes_value:
            launcher.add_argument(*names, dest=dest, metavar="VALUE")
        else:
            launcher.add_argument(*names, dest=dest, action="store_true")
    p.add_argument("--config", dest="early_config", help=argparse.SUPPRESS)  # tolerated before RECIPE too
    p.add_argument("recipe", help="recipe name (e.g. lora_finetune) or path to a recipe script")
    p.add_argument(
        "recipe_args",
        nargs=argparse.REMAINDER,
        metavar="--config CFG [key=value ...]",
        help="arguments for the recipe: its config and overrides",
    )
    p.set_defaults(func=run)


def _config_arg(recipe_args: list[str]) -> str | None:
    for i, tok in enumerate(recipe_args):
        if tok == "--config" and i + 1 < len(recipe_args):
            return recipe_args[i + 1]
        if tok.startswith("--config="):
            return tok.split("=", 1)[1]
    return None


def _check_config(args: argparse.Namespace, recipe_args: list[str]) -> None:
    """Fail early on an unknown config; warn when it was written for another recipe."""
    cfg = _config_arg(recipe_args)
    if cfg is None:
        return
    path = registry.resolve_config(cfg)
    declared = registry.declared_recipe(path)
    if declared and args.recipe in registry.list_recipes() and declared != args.recipe:
        print(
            f"tune run: warning: config '{cfg}' declares '# recipe: {declared}' but recipe '{args.recipe}' is run.",
            file=sys.stderr,
        )


def launcher_args(args: argparse.Namespace) -> list[str]:
    """torchrun arguments from the parsed flags (empty when none was given).

    A single-node run without an explicit rendezvous gets ``--standalone`` (a free local port),
    so two jobs on one machine do not collide on torchrun's default port.
    """
    out: list[str] = []
    for dest, takes_value in LAUNCHER_FLAGS:
        value = getattr(args, dest)
        if takes_value and value is not None:
            out += [f"--{dest}", str(value)]
        elif not takes_value and value:
            out.append(f"--{dest}")
    if not out:
        return out
    single_node = args.nnodes in (None, "1", "1:1")
    explicit = any(getattr(args, d) for d in ("rdzv_endpoint", "master_addr", "master_port", "standalone"))
    if single_node and not explicit:
        out.append("--standalone")
    return out


def run_in_process(recipe: Path, recipe_args: list[str]) -> int:
    """Run ``recipe`` as ``__main__`` with ``sys.argv = [recipe, *recipe_args]``; return its exit status."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(recipe), *recipe_args]
    sys.path.insert(0, str(recipe.parent))
    try:
        runpy.run_path(str(recipe), run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def run_distributed(launcher: list[str], recipe: Path, recipe_args: list[str]) -> int:
    """Start ``recipe`` under torchrun; return 0, or 1 when a worker failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main([*launcher, str(recipe), *recipe_args])
    except ChildFailedError as e:
        if show_traceback():
            print(f"tune run: a worker failed:\n{e}", file=sys.stderr)
        else:  # each worker printed its own short message above
            codes = sorted({f.exitcode for f in e.failures.values()})
            print(
                f"tune run: {len(e.failures)} worker process(es) failed (exit code {', '.join(map(str, codes))}); "
                "their messages are above (TINYTUNE_TRACEBACK=1 for details)",
                file=sys.stderr,
            )
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Resolve the recipe and config, then run in-process or through torchrun."""
    recipe = registry.resolve_recipe(args.recipe).resolve()
    recipe_args = list(args.recipe_args)
    if args.early_config is not None:
        recipe_args = ["--config", args.early_config, *recipe_args]
    _check_config(args, recipe_args)
    launcher = launcher_args(args)
    if launcher:
        return run_distributed(launcher, recipe, recipe_args)
    return run_in_process(recipe, recipe_args)
