"""Training progress bar and throughput meter."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from tinytune.errors import run_context


class TrainProgress:
    """A tqdm bar over optimizer steps showing loss, LR and label tokens/s (ETA from tqdm).

    Args:
        total_steps: steps of the whole run.
        initial_step: steps already done (resume).
        desc: bar label.
        disable: no bar (e.g. non-zero ranks).
    """

    def __init__(self, total_steps: int, initial_step: int = 0, desc: str = "train", disable: bool = False) -> None:
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=desc,
            dynamic_ncols=True,
            disable=disable,
            file=sys.stderr,
            mininterval=0.5,
        )
        self._t = time.perf_counter()
        run_context.step = initial_step
        run_context.on_exit.append(self.close)  # an error message then starts on its own line

    def tick(self) -> float:
        """Seconds since the previous tick (or construction); restarts the clock."""
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt

    def update(self, loss: float, lr: float, tokens_per_s: float) -> None:
        """Advances one step and refreshes the postfix."""
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
        self.bar.update(1)
        run_context.step = self.bar.n  # for the Ctrl-C / full-disk message

    def close(self) -> None:
        self.bar.close()
