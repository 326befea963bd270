"""How far a run has come: the position in the data, the steps, the best evaluation, the records.

Two counters move through a run: ``window`` (how many windows of ``grad_accum`` micro-batches
were consumed: the position in the data) and ``step`` (how many optimizer updates were applied:
what the schedule, evaluation and ``--max-steps`` count). They differ only by the steps the fp16
GradScaler skipped because the gradients overflowed: a skipped step is not a step.

``records`` is what ``metrics.jsonl`` holds: one dict per logged step, evaluation or skip.
The checkpoint stores all of it (``state_dict``), so a resumed run goes on where it stopped.
"""
import dataclasses
from dataclasses import dataclass, field

from . import report


@dataclass
class Progress:
    window: int = 0
    step: int = 0
    skipped_steps: int = 0
    skips_in_a_row: int = 0
    stopped_early: bool = False
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    records: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    train_examples: int = 0

    def consumed_window(self, examples: int, seconds: float) -> None:
        """One window of micro-batches went forward and backward, applied or not."""
        self.window += 1
        self.train_examples += examples
        self.train_seconds += seconds

    def skipped(self, loss: float, scale: float) -> None:
        """The update of the last window was not applied (non-finite gradients)."""
        self.skipped_steps += 1
        self.skips_in_a_row += 1
        self.records.append({"kind": "skip", "step": self.step, "window": self.window, "loss": loss, "scale": scale})

    def stepped(self) -> None:
        """The update of the last window was applied."""
        self.step += 1
        self.skips_in_a_row = 0

    def log_train(self, epoch: int, loss: float, lr: float) -> None:
        self.records.append({"kind": "train", "step": self.step, "epoch": epoch, "loss": loss, "lr": lr,
                             "examples_per_s": self.throughput, "skipped_steps": self.skipped_steps})

    def evaluated(self, metrics: dict, metric: str, patience: int) -> bool:
        """Record an evaluation; True when ``metrics[metric]`` is the best so far. After
        ``patience`` evaluations in a row without improvement the run stops early."""
        self.records.append({"kind": "eval", "step": self.step, **metrics})
        improved = report.is_improvement(metric, metrics[metric], self.best)
        if improved:
            self.best, self.best_step, self.bad_evals = metrics[metric], self.step, 0
        else:
            self.bad_evals += 1
        self.stopped_early = self.bad_evals >= patience
        return improved

    @property
    def throughput(self) -> float:
        """Training examples per second (all ranks' examples, forward + backward + step)."""
        return self.train_examples / max(self.train_seconds, 1e-9)

    def best_evaluation(self) -> dict:
        """The metrics of the best evaluation."""
        best = next(r for r in self.records if r["kind"] == "eval" and r["step"] == self.best_step)
        return {k: v for k, v in best.items() if k not in ("kind", "step")}

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)
