"""Metric loggers: stdout, JSONL file, TensorBoard (optional), Weights & Biases (optional).

Every logger has ``log_dict(metrics: dict[str, float], step: int)`` and ``close()``.
:func:`build_metric_loggers` turns a config list such as ``[stdout, jsonl, tensorboard]`` into one
:class:`MetricLoggerGroup`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterable, Mapping, TextIO


def _scalar(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    return v


class StdoutLogger:
    """Prints ``step N | key: value ...`` lines (through tqdm.write when a bar is active)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        parts = []
        for k, v in metrics.items():
            v = _scalar(v)
            parts.append(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
        line = f"step {step} | " + " | ".join(parts)
        try:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream or sys.stdout)
        except ImportError:  # pragma: no cover
            print(line, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


class JSONLLogger:
    """Appends one JSON object per call (``{"step": N, "time": t, ...metrics}``) to a file."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class TensorBoardLogger:
    """Writes scalars with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "metric_loggers: 'tensorboard' needs the tensorboard package: pip install tensorboard "
                "(or remove 'tensorboard' from metric_loggers)"
            ) from e
        self._w = SummaryWriter(log_dir=log_dir)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        for k, v in metrics.items():
            v = _scalar(v)
            if isinstance(v, (int, float)):
                self._w.add_scalar(k, v, global_step=step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class WandBLogger:
    """Logs to Weights & Biases (needs the ``wandb`` package and a login or ``WANDB_MODE=offline``)."""

    def __init__(self, project: str = "tinytune", log_dir: str | None = None, config: dict | None = None, **kwargs) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                "metric_loggers: 'wandb' needs the wandb package: pip install wandb "
                "(or remove 'wandb' from metric_loggers)"
            ) from e
        self._run = wandb.init(project=project, dir=log_dir, config=config, **kwargs)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run.log({k: _scalar(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricLoggerGroup:
    """Forwards each call to several loggers."""

    def __init__(self, loggers: Iterable[Any]) -> None:
        self.loggers = list(loggers)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log_dict(metrics, step)

    def log(self, name: str, value: Any, step: int) -> None:
        self.log_dict({name: value}, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


LOGGERS = ("stdout", "jsonl", "tensorboard", "wandb")


def build_metric_loggers(
    names: Iterable[str] | str | None, output_dir: str, metrics_file: str = "metrics.jsonl",
    wandb_project: str = "tinytune", config: dict | None = None,
) -> MetricLoggerGroup:
    """Builds the loggers named in ``names`` (``stdout``, ``jsonl``, ``tensorboard``, ``wandb``).

    Args:
        names: a list of logger names (or one comma-separated string); None = ``[stdout, jsonl]``.
        output_dir: run directory; JSONL goes to ``output_dir/metrics_file``, TensorBoard events to
            ``output_dir/tensorboard``.
        metrics_file: JSONL file name.
        wandb_project: W&B project name.
        config: run config passed to W&B.

    Raises:
        ValueError: for an unknown logger name.
    """
    if names is None:
        names = ["stdout", "jsonl"]
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    loggers = []
    for n in names:
        if n == "stdout":
            loggers.append(StdoutLogger())
        elif n == "jsonl":
            loggers.append(JSONLLogger(os.path.join(output_dir, metrics_file)))
        elif n == "tensorboard":
            loggers.append(TensorBoardLogger(os.path.join(output_dir, "tensorboard")))
        elif n == "wandb":
            loggers.append(WandBLogger(project=wandb_project, log_dir=output_dir, config=config))
        else:
            raise ValueError(f"metric_loggers: unknown logger {n!r}; choose from {list(LOGGERS)}")
    return MetricLoggerGroup(loggers)
