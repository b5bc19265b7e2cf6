"""Metric loggers: stdout, JSONL file, TensorBoard (optional), Weights & Biases (optional).

Every logger has ``log_dict(metrics: dict[str, float], step: int)`` and ``close()``.
:func:`build_metric_loggers` turns a config list such as ``[stdout, jsonl, tensorboard]`` into one
:class:`MetricLoggerGroup`.

The recipes' per-step bookkeeping lives here too, so every recipe logs the same keys in the same
order: :func:`train_row` (one training row), :class:`LogWindow` (means over the steps since the last
log line, plus run totals), :func:`log_train_row` (adds memory stats and ``grad_norm``),
:func:`validation_row`, :func:`report_early_stop` and :func:`write_summary` (``summary.json``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, TextIO

from tinytune.datasets import data_summary
from tinytune.errors import dumps_json_line, json_safe
from tinytune.training.plotting import plot_loss

log = logging.getLogger(__name__)


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
            from tqdm import tqdm  # noqa: PLC0415 (guarded: stdout logger works without tqdm)

            tqdm.write(line, file=self.stream or sys.stdout)
        except ImportError:  # pragma: no cover
            print(line, file=self.stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


def drop_torn_last_line(path: str) -> None:
    """Cuts an unterminated last line (a run killed mid-write) off a JSONL file, with a warning."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        content = f.read()
        keep = content.rfind(b"\n") + 1  # 0 when the file is one torn line
        f.truncate(keep)
    log.warning(
        "%s: dropped a torn last line (%d bytes, the run was interrupted while writing it)", path, len(content) - keep
    )


class JSONLLogger:
    """Appends one JSON object per call (``{"step": N, "time": t, ...metrics}``) to a file."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        drop_torn_last_line(path)
        self._f = open(path, "a", encoding="utf-8")

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        """Appends one row; NaN/Inf values are written as ``null`` (strict JSON)."""
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        self._f.write(dumps_json_line(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class TensorBoardLogger:
    """Writes scalars with ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package)."""

    def __init__(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional: tensorboard)
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

    def __init__(
        self, project: str = "tinytune", log_dir: str | None = None, config: dict | None = None, **kwargs
    ) -> None:
        try:
            import wandb  # noqa: PLC0415 (optional: wandb)
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
    names: Iterable[str] | str | None,
    output_dir: str,
    metrics_file: str = "metrics.jsonl",
    wandb_project: str = "tinytune",
    config: dict | None = None,
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


# ---- recipe bookkeeping -------------------------------------------------------------------------


def train_row(loss: float, lr: float, label_tokens: int, seconds: float, epoch: int) -> dict[str, Any]:
    """One training row in its fixed key order: ``loss, lr, tokens_per_s, label_tokens, epoch``.

    Args:
        loss: mean loss per label token (of one step, or the mean over a log window).
        lr: learning rate used for the step.
        label_tokens: label tokens the numbers cover.
        seconds: wall-clock seconds the numbers cover (``tokens_per_s = label_tokens / seconds``).
        epoch: current data epoch.
    """
    return {
        "loss": loss,
        "lr": lr,
        "tokens_per_s": label_tokens / max(seconds, 1e-9),
        "label_tokens": label_tokens,
        "epoch": epoch,
    }


class LogWindow:
    """Per-step numbers summed since the last log line, plus totals over the whole run.

    The single-device SFT recipes log means over each log interval: ``loss`` is the mean of the
    step losses, ``tokens_per_s`` the window's label tokens over its seconds. The run totals
    (``total_tokens``, ``total_seconds``, ``last_loss``) are never reset and feed ``summary.json``.
    """

    def __init__(self) -> None:
        self.last_loss = float("nan")
        self.total_tokens = 0
        self.total_seconds = 0.0
        self._clear()

    def _clear(self) -> None:
        self.loss_sum, self.steps, self.tokens, self.seconds = 0.0, 0, 0, 0.0

    def add(self, loss: float, label_tokens: int, seconds: float) -> None:
        """Records one optimizer step (its mean loss, label tokens and duration)."""
        self.total_seconds += seconds
        self.total_tokens += label_tokens
        self.last_loss = loss
        self.loss_sum += loss
        self.steps += 1
        self.tokens += label_tokens
        self.seconds += seconds

    def flush(self, lr: float, epoch: int) -> dict[str, Any]:
        """The :func:`train_row` of the means since the last flush; starts a new window."""
        row = train_row(self.loss_sum / self.steps, lr, self.tokens, self.seconds, epoch)
        self._clear()
        return row

    def totals(self) -> dict[str, Any]:
        """``{"train_seconds": rounded to 0.01, "train_label_tokens": int}`` for ``summary.json``."""
        return {"train_seconds": round(self.total_seconds, 2), "train_label_tokens": self.total_tokens}


def log_train_row(loggers: Any, step: int, row: Mapping[str, Any], device: Any, grad_norm: float | None = None) -> None:
    """Logs a training row followed by memory stats and ``grad_norm`` (when clipping); resets the peak.

    Args:
        loggers: a :class:`MetricLoggerGroup` (or anything with ``log_dict``).
        step: optimizer step.
        row: the step's numbers (e.g. :func:`train_row`); keys keep their order.
        device: the training device (peak memory since the previous call is reported, then reset).
        grad_norm: gradient norm before clipping, or None (then the key is left out).
    """
    from tinytune.training.memory import memory_stats, reset_peak_memory  # noqa: PLC0415 (torch)

    metrics = {**row, **memory_stats(device)}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    loggers.log_dict(metrics, step)
    reset_peak_memory(device)


def validation_row(val: Mapping[str, Any]) -> dict[str, Any]:
    """``{"val_loss", "val_perplexity"}`` from an ``evaluate_loss`` result."""
    return {"val_loss": val["loss"], "val_perplexity": val["perplexity"]}


def report_early_stop(step: int) -> None:
    """Prints the ``stop_after_steps`` message (the run ends early; a later run resumes)."""
    print(f"stopped after step {step} (stop_after_steps); resume with resume_from_checkpoint=auto")


def report_patience_stop(step: int, patience: int) -> None:
    """Prints the early-stopping message (no validation improvement in ``patience`` evaluations)."""
    print(f"early stopping at step {step}: no validation improvement in {patience} evaluations")


def end_after_stop(step: int, loss: float, out_dir: str, progress, loggers, rank0: bool = True) -> dict:
    """Ends a run at ``stop_after_steps``: closes the progress bar and the loggers, prints the resume
    hint (rank 0) and returns the short summary ``{"step", "loss", "output_dir"}``."""
    progress.close()
    loggers.close()
    if rank0:
        report_early_stop(step)
    return {"step": step, "loss": loss, "output_dir": out_dir}


def run_summary(step: int, loss: float, out_dir: str, skipped_steps: int, train_ds) -> dict:
    """The summary every single-device preference run starts from: ``{"step", "loss", "output_dir",
    "skipped_steps", "data"}`` (``data``: :func:`tinytune.datasets.data_summary` of ``train_ds``)."""
    return {
        "step": step,
        "loss": loss,
        "output_dir": out_dir,
        "skipped_steps": skipped_steps,
        "data": data_summary(train_ds),
    }


def write_summary(out_dir: str, summary: dict, t_start: float) -> dict:
    """Adds ``total_seconds`` (since ``t_start``, a ``perf_counter`` value), writes
    ``out_dir/summary.json``, prints ``done: {...}`` and returns ``summary``.

    Non-finite floats (a loss when the run resumed at its last step and trained nothing) become
    ``null``, so the file stays valid JSON."""
    summary.update({k: None for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)})
    summary["total_seconds"] = round(time.perf_counter() - t_start, 2)
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(json_safe(summary), f, indent=2, default=str, allow_nan=False)
    print(f"done: {json.dumps(summary, default=str)}")
    return summary


def plot_and_write_summary(out_dir: str, summary: dict, t_start: float, plot_title: str | None) -> dict:
    """Plots ``out_dir/metrics.jsonl`` into ``out_dir/loss.png`` titled ``plot_title`` (``None``: no
    plot; the path goes in ``summary["loss_plot"]``), then :func:`write_summary`."""
    if plot_title is not None:
        summary["loss_plot"] = plot_loss(
            os.path.join(out_dir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"), title=plot_title
        )
    return write_summary(out_dir, summary, t_start)
