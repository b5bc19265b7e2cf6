"""Learning-rate schedules with linear warmup: constant, cosine, linear decay."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

SCHEDULERS = ("constant", "cosine", "linear")


def resolve_warmup_steps(num_training_steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None) -> int:
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
    name: str | None = None,
    num_training_steps: int = 1,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    min_lr_ratio: float = 0.0,
    last_epoch: int = -1,
    _component_: str | None = None,
    **component_kwargs,
) -> LRScheduler:
    """Builds a :class:`~torch.optim.lr_scheduler.LambdaLR` with linear warmup.

    Args:
        optimizer: the optimizer whose LR is scheduled.
        name: ``constant``, ``cosine`` (default) or ``linear``.
        num_training_steps: total optimizer steps (decay ends here).
        warmup_steps: linear-warmup steps; or
        warmup_ratio: warmup as a fraction of ``num_training_steps``.
        min_lr_ratio: final LR as a fraction of the base LR (cosine/linear).
        last_epoch: for resuming (usually restore with ``load_state_dict`` instead).
        _component_: instead of ``name``, any scheduler factory by dotted path (torchtune-style,
            e.g. ``torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup`` or
            ``torch.optim.lr_scheduler.StepLR``). It is called with the optimizer and the config's
            other keys (``component_kwargs``), plus ``num_training_steps`` when it takes that
            argument and the config does not set it.
        **component_kwargs: the keys for ``_component_`` (an error without it).

    Raises:
        ValueError: both ``name`` and ``_component_``, or unknown keys without ``_component_``.
        ConfigError: a ``_component_`` that does not import or does not take the given keys.

    Example:
        >>> sched = get_lr_scheduler(opt, "cosine", num_training_steps=100, warmup_ratio=0.1)
        >>> opt.step(); sched.step()
    """
    if _component_ is not None:
        if name is not None:
            raise ValueError(f"lr_scheduler: set either name ({name!r}) or _component_ ({_component_!r}), not both")
        import inspect  # noqa: PLC0415

        from omegaconf import OmegaConf  # noqa: PLC0415

        from tinytune.config import instantiate, locate  # noqa: PLC0415

        kwargs = dict(component_kwargs)
        for key, value in (("warmup_steps", warmup_steps), ("warmup_ratio", warmup_ratio)):
            if value is not None:
                kwargs[key] = value
        try:
            takes_steps = "num_training_steps" in inspect.signature(locate(_component_, "lr_scheduler")).parameters
        except (TypeError, ValueError):  # builtins without a signature
            takes_steps = False
        if takes_steps:
            kwargs.setdefault("num_training_steps", num_training_steps)
        node = OmegaConf.create({"lr_scheduler": {"_component_": _component_, **kwargs}}).lr_scheduler
        return instantiate(node, optimizer)
    if component_kwargs:
        raise ValueError(
            f"lr_scheduler: unknown key(s) {sorted(component_kwargs)} for name={name or 'cosine'!r}; the keys are "
            "name, warmup_steps, warmup_ratio, min_lr_ratio (or give _component_ for another scheduler)"
        )
    name = name or "cosine"
    warm = resolve_warmup_steps(num_training_steps, warmup_steps, warmup_ratio)
    return LambdaLR(optimizer, lr_lambda(name, num_training_steps, warm, float(min_lr_ratio)), last_epoch=last_epoch)
