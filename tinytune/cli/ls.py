"""``tune ls``: list the shipped recipes and the configs written for each."""

from __future__ import annotations

import argparse

from tinytune.config import registry


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ls`` subcommand."""
    p = subparsers.add_parser(
        "ls",
        help="list recipes and their configs",
        description="List the shipped recipes and, for each, the configs whose '# recipe:' header names it.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also show file paths")
    p.set_defaults(func=run)


def rows() -> list[tuple[str, str, str]]:
    """``(recipe, config, path)`` rows; the recipe cell is empty on continuation rows."""
    recipes = registry.list_recipes()
    configs = registry.list_configs()
    by_recipe: dict[str, list[registry.ConfigEntry]] = {name: [] for name in recipes}
    orphans: dict[str, list[registry.ConfigEntry]] = {}
    for entry in configs.values():
        if entry.recipe in by_recipe:
            by_recipe[entry.recipe].append(entry)
        else:
            label = "(no recipe header)" if entry.recipe is None else f"{entry.recipe} (missing recipe)"
            orphans.setdefault(label, []).append(entry)
    out: list[tuple[str, str, str]] = []
    for recipe, entries in list(by_recipe.items()) + sorted(orphans.items()):
        path = str(recipes[recipe]) if recipe in recipes else ""
        if not entries:
            out.append((recipe, "", path))
        for i, entry in enumerate(entries):
            out.append((recipe if i == 0 else "", entry.name, str(entry.path)))
    return out


def format_table(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    """Left-aligned text table with a header and column gaps of three spaces."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *body]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the table; returns 0."""
    table = rows()
    if not table:
        print(f"No recipes or configs found (looked in {registry.recipes_dir()} and {registry.configs_dir()}).")
        return 0
    if args.verbose:
        print(format_table(("RECIPE", "CONFIG", "FILE"), table))
    else:
        print(format_table(("RECIPE", "CONFIG"), [r[:2] for r in table]))
    return 0
