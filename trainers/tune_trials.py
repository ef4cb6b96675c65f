"""How Tune's trials look from outside: a trainable class named after the method (the dashboard
and the job log show `<method> trial <id> <params>`, not `ImplicitFunc`), and a callback that
logs one line per trial that ends (the job log is otherwise silent while Tune runs at verbose=0)."""
from __future__ import annotations

import logging
from typing import Any

from metatta.search import SearchConfig

log = logging.getLogger("trainers.tune")  # the search's own logger: one place to read the job log


def named_trainable(trainable, method: str):
    """A trainable class named after the method (`TentTrial`, not Tune's anonymous
    `ImplicitFunc`) whose actors show as `<method> trial <id> <params>` in the Ray dashboard
    (Ray takes an actor's dashboard name from its `__repr__`)."""
    from ray.tune.trainable.function_trainable import wrap_function

    base = wrap_function(trainable)

    def describe(self) -> str:
        params = " ".join(f"{k}={short_value(v)}" for k, v in sorted((self.config or {}).items()))
        return f"{method} trial {self.trial_id} {params}".strip()

    class_name = "".join(part.capitalize() for part in method.split("_")) + "Trial"
    return type(class_name, (base,), {"__repr__": describe, "_name": class_name})


def short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def progress_callback(cfg: SearchConfig):
    """A Tune callback that logs one line per trial that ends (the job log is otherwise silent
    while `verbose=0`), with its id, parameters, how it ended and its error."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.ended = 0

        def _line(self, trial, how: str, result: dict | None) -> None:
            self.ended += 1
            params = {k: short_value(v) for k, v in (trial.config or {}).items() if k in cfg.space}
            error = f"mean error {result['mean_error']:.2f}%" if result and "mean_error" in result else "no result"
            log.info("search %s: trial %s %s (%d/%d ended) %s -> %s", cfg.name, trial.trial_id, how, self.ended,
                     cfg.num_samples, params, error)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            result = trial.last_result or {}
            self._line(trial, "completed" if result.get("final") else "stopped by ASHA", result)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "failed", trial.last_result)

    return TrialProgress()
