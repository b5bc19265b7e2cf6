"""``loss.png``: training and validation loss curves from a metrics JSONL file."""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    """Reads a metrics JSONL file (one JSON object per line); skips blank lines.

    Raises:
        ValueError: naming the file and line of a malformed row.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON object ({e})") from None
    return rows


def loss_curves(rows: list[dict], train_key: str = "loss", val_key: str = "val_loss") -> tuple[list, list]:
    """Extracts ``(train, val)`` as lists of ``(step, value)`` pairs (last value wins per step)."""
    train, val = {}, {}
    for r in rows:
        if "step" not in r:
            continue
        if train_key in r and r[train_key] is not None:
            train[int(r["step"])] = float(r[train_key])
        if val_key in r and r[val_key] is not None:
            val[int(r["step"])] = float(r[val_key])
    return sorted(train.items()), sorted(val.items())


def plot_loss(metrics_path: str, out_path: str, title: str | None = None) -> str | None:
    """Plots train (and validation, if logged) loss against step into ``out_path`` (PNG).

    Uses matplotlib's non-interactive Agg back end. Returns ``out_path``, or None (with a message)
    when matplotlib is missing or nothing was logged.
    """
    if not os.path.isfile(metrics_path):
        print(f"loss plot skipped: {metrics_path} not found")
        return None
    train, val = loss_curves(read_metrics(metrics_path))
    if not train and not val:
        print(f"loss plot skipped: no loss values in {metrics_path}")
        return None
    try:
        import matplotlib  # noqa: PLC0415 (optional: matplotlib)

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: matplotlib)
    except ImportError:
        print("loss plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", linewidth=1.4)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation", linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per label token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
