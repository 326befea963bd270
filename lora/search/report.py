"""What a search leaves behind: ``trials.csv``, ``best.json``, three plots and a one-screen summary.

Everything is read back from the study, so any worker (or a later look) writes the same files.
"""

import json
import statistics
import warnings
from pathlib import Path

import optuna
import pandas as pd
from matplotlib.figure import Figure

State = optuna.trial.TrialState


def outcome(trial: optuna.trial.FrozenTrial) -> str:
    """complete, pruned (behind at an evaluation), over budget (never trained), failed or running."""
    if trial.state == State.PRUNED:
        return "over budget" if trial.user_attrs.get("over_budget") else "pruned"
    return {State.FAIL: "failed"}.get(trial.state, trial.state.name.lower())


def count_trained(study: optuna.Study) -> int:
    """Trials that trained to their end or until pruned: what ``--trials`` counts."""
    return sum(outcome(t) in ("complete", "pruned") for t in study.get_trials(deepcopy=False))


def seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    return None if trial.duration is None else round(trial.duration.total_seconds(), 1)


def trial_line(trial: optuna.trial.FrozenTrial, metric: str) -> str:
    """One line per finished trial, printed as the search goes."""
    count = trial.user_attrs.get("trainable_parameters")
    size = "" if count is None else f"{count:,} trainable parameters, "
    state = outcome(trial)
    if state == "complete":
        detail = f"validation {metric} {trial.value:.4f}"
    elif state == "pruned":
        step, value = max(trial.intermediate_values.items())
        detail = f"pruned at step {step} (validation {metric} {value:.4f})"
    else:
        detail = state
    return f"trial {trial.number}: {detail}; {size}{trial.user_attrs.get('steps', 0)} steps in {seconds(trial)} s"


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial: state, value, trainable count, steps, seconds, worker, parameters, command."""
    rows = [
        {
            "trial": t.number,
            "state": outcome(t),
            "value": t.value,
            "trainable_parameters": t.user_attrs.get("trainable_parameters"),
            "steps": t.user_attrs.get("steps", 0),
            "seconds": seconds(t),
            "worker": t.user_attrs.get("worker"),
            **t.params,
            "command": t.user_attrs.get("command"),
        }
        for t in study.get_trials(deepcopy=False)
    ]
    return pd.DataFrame(rows)


def pruning_savings(table: pd.DataFrame) -> str:
    """How much training pruning saved: the steps pruned trials did not run, against a full
    trial's steps (the most any completed trial ran), and the time that stands for."""
    complete, pruned = table[table.state == "complete"], table[table.state == "pruned"]
    if complete.empty or pruned.empty:
        return "pruning: no trial was pruned" if complete.size else "pruning: no completed trial yet"
    full_steps = int(complete.steps.max())
    saved_steps = int((full_steps - pruned.steps).clip(lower=0).sum())
    planned = full_steps * (len(complete) + len(pruned))
    full_seconds = statistics.median(complete.seconds)
    spent = table[table.state.isin(["complete", "pruned"])].seconds.sum()
    saved_seconds = max(0.0, float((full_seconds - pruned.seconds).sum()))
    return (
        f"pruning: {len(pruned)} trials stopped after {pruned.steps.mean():.0f} of {full_steps} steps "
        f"on average: {saved_steps:,} of {planned:,} steps not run ({100 * saved_steps / planned:.0f}%); "
        f"about {saved_seconds / 60:.1f} min saved on {spent / 60:.1f} min of trials "
        f"(a full trial: median {full_seconds:.0f} s)"
    )


def plot_accuracy_vs_parameters(
    table: pd.DataFrame, max_params: int | None, metric: str, path: Path, last_values: dict[int, float]
) -> None:
    """Validation metric against trainable parameters: completed trials, pruned ones at their
    last evaluation, and the budget line."""
    figure = Figure(figsize=(7, 4.5), layout="tight")
    axes = figure.subplots()
    complete = table[table.state == "complete"]
    axes.scatter(complete.trainable_parameters, complete.value, label="complete", zorder=3)
    pruned = table[table.trial.isin(last_values.keys())]
    axes.scatter(
        pruned.trainable_parameters,
        [last_values[n] for n in pruned.trial],
        facecolors="none",
        edgecolors="grey",
        label="pruned (last evaluation)",
    )
    if max_params is not None:
        axes.axvline(max_params, color="red", linestyle="--", label=f"budget {max_params:,}")
    axes.set_xscale("log")
    axes.set_xlabel("trainable parameters")
    axes.set_ylabel(f"validation {metric}")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


def save_optuna_plot(plot, path: Path, **kwargs) -> bool:
    """Draw one of optuna.visualization.matplotlib's plots into ``path``; False when the study
    cannot make it yet (importances need two completed trials with varied parameters). Optuna
    draws with pyplot: the figure is closed again, so that nothing shows up in a notebook."""
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notices
            axes = plot(**kwargs)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return False
    axes.figure.set_size_inches(8, 5)
    axes.figure.tight_layout()
    axes.figure.savefig(path, dpi=120)
    plt.close(axes.figure)
    return True


def write_results(study: optuna.Study, directory: Path, metric: str, max_params: int | None) -> str:
    """Write trials.csv, best.json and the plots into ``directory``; return the summary text."""
    table = trials_table(study)
    table.to_csv(directory / "trials.csv", index=False)
    counts = table.state.value_counts()
    spent = table[table.state.isin(["complete", "pruned"])].seconds.sum()
    lines = [
        f"search {directory}: {counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
        f"{counts.get('over budget', 0)} over the budget (not trained), {counts.get('failed', 0)} failed, "
        f"{counts.get('running', 0)} running; {spent / 60:.1f} min of trials"
    ]
    complete = table[table.state == "complete"]
    if complete.empty:
        return "\n".join(lines + ["no completed trial yet"])

    best = study.best_trial
    budget = "no budget" if max_params is None else f"budget {max_params:,}"
    result = {
        "metric": metric,
        "value": best.value,
        "trial": best.number,
        "trainable_parameters": best.user_attrs["trainable_parameters"],
        "max_params": max_params,
        "params": best.params,
        "adapter": str(directory / f"trial-{best.number}"),
        "command": best.user_attrs["command"],
    }
    (directory / "best.json").write_text(json.dumps(result, indent=2) + "\n")

    plots = ["trials.csv", "best.json"]
    last_values = {
        t.number: max(t.intermediate_values.items())[1]
        for t in study.get_trials(deepcopy=False)
        if outcome(t) == "pruned" and t.intermediate_values
    }
    plot_accuracy_vs_parameters(table, max_params, metric, directory / "accuracy_vs_parameters.png", last_values)
    plots.append("accuracy_vs_parameters.png")
    matplotlib_plots = optuna.visualization.matplotlib
    if save_optuna_plot(
        matplotlib_plots.plot_optimization_history,
        directory / "history.png",
        study=study,
        target_name=f"validation {metric}",
    ):
        plots.append("history.png")
    if save_optuna_plot(
        matplotlib_plots.plot_param_importances,
        directory / "importances.png",
        study=study,
        evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
        target_name=f"validation {metric}",
    ):
        plots.append("importances.png")

    ascending = study.direction == optuna.study.StudyDirection.MINIMIZE
    top = complete.sort_values("value", ascending=ascending).head(5)
    shown = [
        c
        for c in (
            "trial",
            "value",
            "trainable_parameters",
            "seconds",
            "target_modules",
            "layers",
            "head",
            "r",
            "alpha_over_r",
            "lr",
            "batch_size",
            "grad_accum",
        )
        if c in top
    ]
    lines += [
        f"best: trial {best.number}, validation {metric} {best.value:.4f}, "
        f"{result['trainable_parameters']:,} trainable parameters ({budget})",
        "  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in best.params.items()),
        f"top {len(top)} by validation {metric}:",
        top[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        pruning_savings(table),
        f"retrain it (and test it once): {result['command']}",
        f"written to {directory}: {', '.join(plots)}",
    ]
    return "\n".join(lines)
