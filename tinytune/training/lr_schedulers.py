"""Learning-rate schedules with linear warmup: constant, cosine, linear decay."""

from __future__ import annotations

import inspect
import math

from omegaconf import OmegaConf
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from tinytune.config import instantiate, locate

SCHEDULERS = ("constant", "cosine", "linear")


def resolve_warmup_steps(
    num_training_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None
) -> int:
    """Number of warmup steps from ``warmup_steps`` or ``warmup_ratio`` (not both).

    Raises:
        ValueError: both given, or out of range.
    """
    if warmup_steps is not None and warmup_ratio is not None:
        raise ValueError("lr_scheduler: set warmup_steps or warmup_ratio, not both")
    if warmup_ratio is not None:
        if not 0.0 <= float(warmup_ratio) <= 1.0:
            raise ValueError(f"lr_scheduler.warmup_ratio must be in [0, 1], got {warmup_ratio}")
        return int(math.ceil(float(warmup_ratio) * num_training_steps))
    warmup_steps = int(warmup_steps or 0)
    if warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
    return warmup_steps


def lr_lambda(
    name: str, num_training_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0, num_cycles: float = 0.5
):
    """The multiplier ``f(step)`` applied to the base LR (step = optimizer steps taken so far).

    Warmup rises linearly as ``(step + 1) / (warmup_steps + 1)`` (never exactly 0, so no step is
    wasted) and reaches 1 at ``step == warmup_steps``; after warmup: ``constant`` keeps 1, ``linear`` decays to ``min_lr_ratio`` at ``num_training_steps``,
    ``cosine`` follows half a cosine (``num_cycles=0.5``) down to ``min_lr_ratio``.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown lr scheduler {name!r}; choose from {list(SCHEDULERS)}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return float(step + 1) / float(warmup_steps + 1)
        if name == "constant":
            return 1.0
        decay_steps = max(1, num_training_steps - warmup_steps)
        progress = min(1.0, float(step - warmup_steps) / decay_steps)
        if name == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return f


def get_lr_scheduler(
    optimizer: Optimizer,
    name: str = "cosine",
    num_training_steps: int = 1,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
    last_epoch: int = -1,
) -> LambdaLR:
    """Builds a :class:`~torch.optim.lr_scheduler.LambdaLR` with linear warmup.

    Args:
        optimizer: the optimizer whose LR is scheduled.
        name: ``constant``, ``cosine`` or ``linear``.
        num_training_steps: total optimizer steps (decay ends here).
        warmup_steps: linear-warmup steps; or
        warmup_ratio: warmup as a fraction of ``num_training_steps``.
        min_lr_ratio: final LR as a fraction of the base LR (cosine/linear).
        last_epoch: for resuming (usually restore with ``load_state_dict`` instead).

    Example:
        >>> sched = get_lr_scheduler(opt, "cosine", num_training_steps=100, warmup_ratio=0.1)
        >>> opt.step(); sched.step()
    """
    warm = resolve_warmup_steps(num_training_steps, warmup_steps, warmup_ratio)
    return LambdaLR(optimizer, lr_lambda(name, num_training_steps, warm, float(min_lr_ratio)), last_epoch=last_epoch)


def build_lr_scheduler(optimizer: Optimizer, num_training_steps: int, cfg: dict) -> LRScheduler:
    """The scheduler an ``lr_scheduler`` config node describes.

    Args:
        optimizer: the optimizer whose LR is scheduled.
        num_training_steps: total optimizer steps of the run.
        cfg: the node as a mapping. With ``name`` (or no ``_component_``) its keys go to
            :func:`get_lr_scheduler`. With ``_component_`` (torchtune-style, e.g.
            ``torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup`` or
            ``torch.optim.lr_scheduler.StepLR``) that factory is called with the optimizer and exactly
            the node's other keys, plus ``num_training_steps`` when it takes that argument and the
            node does not set it.

    Raises:
        ValueError: both ``name`` and ``_component_``, or a key :func:`get_lr_scheduler` does not take.
        ConfigError: a ``_component_`` that does not import or does not take the given keys.
    """
    cfg = dict(cfg)
    component = cfg.pop("_component_", None)
    if component is None:
        allowed = set(inspect.signature(get_lr_scheduler).parameters) - {"optimizer", "num_training_steps"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(
                f"lr_scheduler: unknown key(s) {unknown}; the keys are {sorted(allowed)} (or give _component_ for "
                "another scheduler)"
            )
        return get_lr_scheduler(optimizer, num_training_steps=num_training_steps, **cfg)
    if "name" in cfg:
        raise ValueError(f"lr_scheduler: set either name ({cfg['name']!r}) or _component_ ({component!r}), not both")

    try:
        takes_steps = "num_training_steps" in inspect.signature(locate(component, "lr_scheduler")).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes_steps = False
    if takes_steps:
        cfg.setdefault("num_training_steps", num_training_steps)
    node = OmegaConf.create({"lr_scheduler": {"_component_": component, **cfg}}).lr_scheduler  # errors name the key
    return instantiate(node, optimizer)


def refresh_lr(lr_scheduler: LRScheduler) -> None:
    """Sets the optimizer's LR from *this* run's schedule at the restored step (after a resume).

    A checkpoint restores the LR the old run computed for its next step; when the run was
    extended (a larger ``max_steps`` or ``epochs``), that value belongs to the old, shorter
    schedule (0 at its end for decaying schedules). Recomputing it from this run's schedule
    extends the schedule instead, and is a no-op when nothing changed.
    """
    step = lr_scheduler.last_epoch
    opt = lr_scheduler.optimizer
    if isinstance(lr_scheduler, LambdaLR):
        lrs = [base * f(step) for base, f in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
    elif hasattr(lr_scheduler, "_get_closed_form_lr"):
        lrs = lr_scheduler._get_closed_form_lr()
    else:  # a schedule without a closed form keeps the restored LR
        return
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    lr_scheduler._last_lr = list(lrs)
