"""Break the product code on purpose, one way at a time, and check that a test notices.

    python tests/sabotage.py             # every sabotage (about 5 minutes on 2 cores)
    python tests/sabotage.py resume rng  # those whose name contains one of these words

Each sabotage replaces one piece of product code in a fresh copy of the repository (never in
this checkout), runs the tests that guard it there, and passes when they fail. A sabotage the
tests do not notice is a missing test. Exit code: the number of sabotages that went unnoticed.
"""

import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOP = "tests/test_loop.py::"
SEARCH = "tests/test_search.py::"
VARIANTS = "tests/test_variants.py::"
EXECUTION = "tests/test_execution.py::"
CONSUMERS = "tests/test_consumers.py::"
SERVE = "tests/test_serve.py::"
LAYERS = "tests/test_layers.py::"
FAMILIES = "tests/test_families.py::"


@dataclass
class Sabotage:
    name: str
    file: str
    original: str
    broken: str
    tests: tuple[str, ...]


SABOTAGES = [
    Sabotage(
        "resume: skip optimizer.load_state_dict",
        "lora/train/run_folder.py",
        'optimisation.optimizer.load_state_dict(saved["optimizer"])',
        "pass",
        (LOOP + "test_resume_is_bit_identical_to_the_uninterrupted_run",),
    ),
    Sabotage(
        "resume: skip the RNG restore",
        "lora/train/run_folder.py",
        'restore_rng_states(saved["rng"][world.rank])',
        "pass",
        (LOOP + "test_resume_is_bit_identical_to_the_uninterrupted_run",),
    ),
    Sabotage(
        "resume: skip the scheduler restore",
        "lora/train/run_folder.py",
        'optimisation.scheduler.load_state_dict(saved["scheduler"])',
        "pass",
        (LOOP + "test_resume_is_bit_identical_to_the_uninterrupted_run",),
    ),
    Sabotage(
        "ctrl-c: no checkpoint at the interrupted step",
        "lora/train/loop.py",
        "same step\n                save_training_state(run.directory, job.model, optimisation, progress, world)\n",
        "same step\n",
        (LOOP + "test_resume_is_bit_identical_to_the_uninterrupted_run",),
    ),
    Sabotage(
        "fp16: step the scheduler on skipped steps",
        "lora/train/loop.py",
        "            if not stepped:\n",
        "            if not stepped:\n                optimisation.scheduler.step()\n",
        (LOOP + "test_fp16_on_cpu_trains_and_a_planted_overflow_skips_exactly_one_step",),
    ),
    Sabotage(
        "fp16: count a skipped step as a step",
        "lora/train/loop.py",
        "                continue\n            optimisation.scheduler.step()",
        "                pass\n            optimisation.scheduler.step()",
        (LOOP + "test_fp16_on_cpu_trains_and_a_planted_overflow_skips_exactly_one_step",),
    ),
    Sabotage(
        "fp16: forget unscale_ before clipping",
        "lora/train/loop.py",
        "    scaler.unscale_(optimizer)  # clip the true gradients",
        "    pass  # clip the true gradients",
        (LOOP + "test_clipping_acts_on_the_true_gradients",),
    ),
    Sabotage(
        "fp32: apply a non-finite gradient",
        "lora/train/loop.py",
        "        if not torch.isfinite(norm):\n            return False\n",
        "",
        (
            LOOP + "test_without_a_scaler_a_non_finite_gradient_is_never_applied",
            LOOP + "test_non_finite_gradients_in_fp32_stop_at_once_with_a_resumable_checkpoint",
        ),
    ),
    Sabotage(
        "fp32: tolerate non-finite windows like fp16 does",
        "lora/train/loop.py",
        "(MAX_CONSECUTIVE_SKIPS if optimisation.scaler.is_enabled() else 1)",
        "MAX_CONSECUTIVE_SKIPS",
        (LOOP + "test_non_finite_gradients_in_fp32_stop_at_once_with_a_resumable_checkpoint",),
    ),
    Sabotage(
        "clipping: ignore --max-grad-norm",
        "lora/train/loop.py",
        "clip_grad_norm_(parameters, max_grad_norm)",
        'clip_grad_norm_(parameters, float("inf"))',
        (LOOP + "test_clipping_acts_on_the_true_gradients",),
    ),
    Sabotage(
        "accumulation: scale the loss per micro-batch, not per window",
        "lora/train/loop.py",
        '* batch.get("loss_weight", 1.0)\n                / window_examples',
        '/ len(batch["labels"])',
        (LOOP + "test_accumulating_8_8_5_gives_the_gradient_of_one_batch_of_21",),
    ),
    Sabotage(
        "schedule: drop the warm-up",
        "lora/train/loop.py",
        "round(config.warmup_ratio * total_steps)",
        "0",
        (LOOP + "test_warmup_then_linear_decay",),
    ),
    Sabotage(
        "weight decay: decay biases too",
        "lora/train/loop.py",
        "skip = parameter.ndim < 2 or ",
        "skip = ",
        (LOOP + "test_weight_decay_skips_biases_and_layernorm",),
    ),
    Sabotage(
        "best adapter: test the last adapter instead",
        "lora/train/loop.py",
        "    load_lora_state_dict(job.model, {k: v.to(device) for k, v in adapter_state.items()})\n",
        "",
        (LOOP + "test_the_best_evaluation_not_the_last_decides_the_tested_adapter",),
    ),
    Sabotage(
        "--overwrite: keep the old checkpoint",
        "lora/train/run_folder.py",
        "            (directory / name).unlink(missing_ok=True)",
        "            pass",
        ("tests/test_training.py::test_overwrite_clears_the_previous_runs_checkpoint",),
    ),
    Sabotage(
        "targets: wrap modules that train in full",
        "lora/model.py",
        "        and not _is_under(name, trainable)\n",
        "",
        ("tests/test_model.py::test_targets_never_reach_modules_trained_in_full",),
    ),
    Sabotage(
        "LoRA: drop the B = 0 initialisation",
        "lora/layer.py",
        "self.lora_B = nn.Parameter(torch.zeros(",
        "self.lora_B = nn.Parameter(torch.ones(",
        ("tests/test_layer.py::test_zero_init_returns_the_base_output_bit_for_bit",),
    ),
    Sabotage(
        "LoRA: merge without the scaling",
        "lora/layer.py",
        "return (self.lora_B.float() @ self.lora_A.float()) * self.scaling",
        "return self.lora_B.float() @ self.lora_A.float()",
        ("tests/test_layer.py::test_merge_then_unmerge_float32",),
    ),
    Sabotage(
        "targets: dotted targets match the last name only",
        "lora/model.py",
        "else path_in_layer(module_name) == target",
        'else module_name.rsplit(".", 1)[-1] == target.rsplit(".", 1)[-1]',
        ("tests/test_model.py::test_dotted_targets_tell_the_three_dense_layers_apart_and_read_back",),
    ),
    Sabotage(
        "search: per-rank count forgets the output width",
        "lora/search/space.py",
        "per_rank = sum(m.base.in_features + m.base.out_features",
        "per_rank = sum(m.base.in_features",
        (SEARCH + "test_counts_from_shapes_equal_count_parameters_of_the_built_model",),
    ),
    Sabotage(
        "search: rank not bounded by the budget",
        "lora/search/space.py",
        "return min(MAX_RANK, (self.max_params - fixed) // per_rank)",
        "return MAX_RANK",
        (SEARCH + "test_the_rank_is_bounded_by_what_the_budget_leaves_and_misfits_are_over_budget",),
    ),
    Sabotage(
        "search: flags given at their default value do not fix their setting",
        "lora/cli/train.py",
        "        action.default = argparse.SUPPRESS",
        "        pass",
        (SEARCH + "test_flags_on_the_command_line_fix_their_settings",),
    ),
    Sabotage(
        "search: evaluations not reported to the pruner",
        "lora/train/loop.py",
        "on_evaluation(progress.step, progress.records[-1])",
        "pass",
        (SEARCH + "test_pruning_stops_a_trial_that_is_made_to_be_bad",),
    ),
    Sabotage(
        "search: a failed trial counts towards --trials",
        "lora/search/report.py",
        'outcome(t) in ("complete", "pruned")',
        'outcome(t) in ("complete", "pruned", "failed")',
        (SEARCH + "test_search_under_a_budget_survives_ctrl_c_and_writes_its_results",),
    ),
    Sabotage(
        "search: each worker its own SQLite file",
        "lora/cli/search.py",
        "(directory / 'study.db')",
        "(directory / f'study-{os.getpid()}.db')",
        (SEARCH + "test_two_processes_share_one_sqlite_study",),
    ),
    Sabotage(
        "search: a study of another search is reused",
        "lora/search/study.py",
        "    elif stored != definition:",
        "    elif False:",
        (SEARCH + "test_a_storage_that_is_not_a_database_or_holds_another_search_is_refused",),
    ),
    Sabotage(
        "variants: DoRA norm not detached",
        "lora/variants.py",
        "        with torch.no_grad():\n            return torch.linalg.norm(",
        "        if True:\n            return torch.linalg.norm(",
        (VARIANTS + "test_dora_logits_and_gradients_match_peft",),
    ),
    Sabotage(
        "variants: DoRA magnitude starts off the row norms",
        "lora/variants.py",
        "self.lora_magnitude.copy_(self.weight_norm(self.base.weight.float()))",
        "self.lora_magnitude.copy_(self.weight_norm(self.base.weight.float()) * (1 + 1e-7))",
        (VARIANTS + "test_zero_init_gives_the_base_model_bit_for_bit",),
    ),
    Sabotage(
        "variants: DoRA ignores dropout on the W x part",
        "lora/variants.py",
        "if self.training and isinstance(self.dropout, nn.Dropout):",
        "if False:",
        (VARIANTS + "test_dora_training_forward_with_dropout_matches_peft_under_the_same_seed",),
    ),
    Sabotage(
        "variants: DoRA merges without the magnitude",
        "lora/variants.py",
        "return scale[:, None] * adapted - weight",
        "return adapted - weight",
        (VARIANTS + "test_dora_merge_matches_peft_and_unmerge_is_bit_exact",),
    ),
    Sabotage(
        "variants: DoRA count without m",
        "lora/model.py",
        "dora = isinstance(module, DoRALinear)",
        "dora = False",
        (VARIANTS + "test_dora_parameter_counts_match_peft_and_the_formula",),
    ),
    Sabotage(
        "variants: PiSSA without the division by the scaling",
        "lora/variants.py",
        "root = (singular[: layer.r] / layer.scaling).sqrt()",
        "root = singular[: layer.r].sqrt()",
        (VARIANTS + "test_pissa_init_matches_peft",),
    ),
    Sabotage(
        "variants: PiSSA saved with +B0",
        "lora/variants.py",
        "torch.cat([layer.lora_B.detach(), -layer.pissa_B0], dim=1),",
        "torch.cat([layer.lora_B.detach(), layer.pissa_B0], dim=1),",
        (VARIANTS + "test_a_pissa_adapter_rebuilds_the_trained_model_from_the_pretrained_one",),
    ),
    Sabotage(
        "variants: PiSSA saved without doubling alpha",
        "lora/model.py",
        "alpha=config.alpha * (2**0.5 if config.rslora else 2),",
        "alpha=config.alpha,",
        (VARIANTS + "test_a_pissa_adapter_rebuilds_the_trained_model_from_the_pretrained_one",),
    ),
    Sabotage(
        "variants: PiSSA accepts another start",
        "lora/variants.py",
        "raise ValueError(\"the adapter's PiSSA start",
        "print(\"the adapter's PiSSA start",
        (VARIANTS + "test_a_pissa_adapter_with_another_start_is_refused",),
    ),
    Sabotage(
        "variants: LoRA+ with peft's 1-D rule",
        "lora/variants.py",
        "if isinstance(layer, LoRALinear)}",
        "if isinstance(layer, LoRALinear)} | {id(p) for p in model.parameters() if p.ndim == 1}",
        (VARIANTS + "test_lora_plus_groups_match_peft_except_for_one_dimensional_tensors",),
    ),
    Sabotage(
        "variants: adamw ignores --lora-plus-ratio",
        "lora/train/loop.py",
        "groups = lora_plus_groups(model, groups, config.lr, config.lora_plus_ratio)",
        "pass",
        (VARIANTS + "test_adamw_with_lora_plus_keeps_weight_decay_rules",),
    ),
    Sabotage(
        "accumulation: one micro-batch per optimizer step",
        "lora/train/loop.py",
        "window_in_epoch * config.grad_accum : (window_in_epoch + 1) * config.grad_accum",
        "window_in_epoch : window_in_epoch + 1",
        (LOOP + "test_each_optimizer_step_consumes_grad_accum_micro_batches",),
    ),
    Sabotage(
        "train(): settings not checked when called from Python",
        "lora/train/loop.py",
        "    config.check()\n    world = distributed.start(",
        "    world = distributed.start(",
        (LOOP + "test_train_called_from_python_refuses_an_invalid_setting_before_anything_happens",),
    ),
    Sabotage(
        "signals: SIGTERM not handled",
        "lora/train/distributed.py",
        "HANDLED = (signal.SIGINT, signal.SIGTERM)",
        "HANDLED = (signal.SIGINT,)",
        (LOOP + "test_resume_is_bit_identical_to_the_uninterrupted_run",),
    ),
    Sabotage(
        "distributed: every rank trains on the whole global batch",
        "lora/train/distributed.py",
        "return indices[start : start + per_rank + (world.rank < extra)]",
        "return indices",
        (
            "tests/test_distributed.py::test_two_processes_train_the_adapter_one_process_trains_with_the_same_effective_batch",
        ),
    ),
    Sabotage(
        "quantize: forward without the bias",
        "lora/quantize.py",
        "return y if self.bias is None else y + self.bias.to(dtype)",
        "return y",
        ("tests/test_quantize.py::test_forward_and_input_gradient_are_those_of_the_dequantized_weight",),
    ),
    Sabotage(
        "variants: DoRA + PiSSA magnitude from the residual's norms",
        "lora/variants.py",
        "    if isinstance(layer, DoRALinear):\n        layer.reset_magnitude()\n",
        "    if isinstance(layer, DoRALinear):\n        layer.lora_magnitude.copy_(weight.norm(dim=1))\n",
        (VARIANTS + "test_dora_with_pissa_starts_equal_to_the_pretrained_model",),
    ),
    Sabotage(
        "resume: flags compared with the defaults, not with what was given",
        "lora/train/run_folder.py",
        "    if explicit is None:\n",
        "    if True:\n",
        (
            "tests/test_run_folder.py::test_resume_refuses_a_flag_given_at_its_default_value_that_differs_from_the_saved_run",
        ),
    ),
    Sabotage(
        "quantize_base: DoRA layers not refused",
        "lora/model.py",
        "    if any(isinstance(module, DoRALinear) for _, module in lora_layers(model)):\n"
        "        raise ValueError(DORA_NEEDS_FLOAT_BASE)\n",
        "",
        ("tests/test_run_folder.py::test_dora_on_a_quantized_base_is_refused_by_the_core_in_one_line",),
    ),
    Sabotage(
        "variants: inspect measures m against the wrong norms",
        "lora/inspection.py",
        "start = weight.norm(dim=1)",
        "start = weight.norm(dim=0)[:weight.shape[0]]",
        (VARIANTS + "test_inspection_reports_the_magnitude_change",),
    ),
    Sabotage(
        "execution: checkpointing draws fresh dropout masks in the recompute",
        "lora/train/execution.py",
        'kwargs = {"use_reentrant": False}',
        'kwargs = {"use_reentrant": False, "preserve_rng_state": False}',
        (EXECUTION + "test_checkpointing_recomputes_the_layers_and_gives_the_same_loss_and_gradients",),
    ),
    Sabotage(
        "execution: --gradient-checkpointing ignored",
        "lora/train/execution.py",
        "    if gradient_checkpointing:\n",
        "    if False:\n",
        (EXECUTION + "test_a_run_with_checkpointing_is_the_run_without",),
    ),
    Sabotage(
        "execution: --compile ignored",
        "lora/train/execution.py",
        "torch.compile(model) if compile else model",
        "model",
        (EXECUTION + "test_compile_gives_the_same_loss_and_gradients_and_a_run_saves_plain_names",),
    ),
    Sabotage(
        "layers: the core imports the command line",
        "lora/model.py",
        "from .config import LoRAConfig\n",
        "from .config import LoRAConfig\nfrom .cli import flag_for  # noqa\n",
        (LAYERS + "test_imports_run_from_the_core_to_the_jobs_to_the_command_lines_never_back",),
    ),
    Sabotage(
        "layers: a plot switches matplotlib's backend",
        "lora/train/report.py",
        "from matplotlib.figure import Figure\n",
        "import matplotlib\nmatplotlib.use('Agg')\nfrom matplotlib.figure import Figure\n",
        (LAYERS + "test_importing_the_library_leaves_matplotlibs_backend_as_it_was",),
    ),
    Sabotage(
        "layers: a cycle between two core modules",
        "lora/variants.py",
        "from .layer import LoRALinear\n",
        "from .layer import LoRALinear\nfrom . import model  # noqa\n",
        (LAYERS + "test_no_import_cycle",),
    ),
    Sabotage(
        "evaluation: metrics with dropout on",
        "lora/train/evaluation.py",
        "    model.eval()\n    mine = ",
        "    mine = ",
        (LOOP + "test_evaluation_runs_with_dropout_off_whatever_mode_the_model_is_in",),
    ),
    Sabotage(
        "several adapters: a float base written as null taken for a quantized one",
        "lora/adapter.py",
        'rest["quantize_base"] = scheme_from_file(rest.get("quantize_base"))',
        'rest["quantize_base"] = rest.get("quantize_base", "none")',
        (
            CONSUMERS + "test_predict_py_with_two_train_py_adapters_answers_each_row_as_each_does_alone",
            "tests/test_serve.py::test_concurrent_requests_for_several_adapters_each_get_their_own_answers",
        ),
    ),
    Sabotage(
        "export: a quantization note for a float base written as null",
        "lora/cli/export.py",
        "if config.quantize_base is not None:",
        'if config.quantize_base != "none":',
        (CONSUMERS + "test_lora_export_notes_a_quantized_base_and_only_that",),
    ),
    Sabotage(
        "adapter config: older files' 'none' taken for a scheme",
        "lora/quantize.py",
        'return None if value in (None, "none") else value',
        "return value",
        (CONSUMERS + "test_older_layouts_read_as_what_they_meant",),
    ),
    Sabotage(
        "serve: no bound on the queued texts",
        "lora/serve/batching.py",
        "if self.queued_texts + len(texts) > self.max_queued_texts:",
        "if False:",
        (
            SERVE + "test_the_batcher_refuses_past_its_bound_and_drops_requests_past_their_deadline",
            SERVE + "test_overload_is_refused_with_429_and_a_late_request_gets_504_with_its_texts_dropped",
        ),
    ),
    Sabotage(
        "serve: requests past their deadline still computed",
        "lora/serve/batching.py",
        "        request.expired = True\n        self._release(request)",
        "        self._release(request)",
        (SERVE + "test_the_batcher_refuses_past_its_bound_and_drops_requests_past_their_deadline",),
    ),
    Sabotage(
        "serve: an oversized body answered before it was read",
        "lora/serve/http.py",
        "        elif received > DISCARD_BYTES or",
        "        elif True or",
        (SERVE + "test_a_body_far_over_the_limit_sent_whole_before_reading_gets_the_json_413",),
    ),
    Sabotage(
        "fused Wqkv: the key rows of B' not zero",
        "lora/variants.py",
        "zeros = diagonal.new_zeros(hidden, k * r)",
        "zeros = diagonal.new_full((hidden, k * r), 1e-3)",
        (FAMILIES + "test_lora_on_the_query_and_value_slices_leaves_the_keys_bit_for_bit",),
    ),
    Sabotage(
        "fused Wqkv: peft's lora_alpha not scaled with the rank",
        "lora/peft_format.py",
        "fused_rank, fused_alpha = k * lora.r, lora.alpha * (k**0.5 if lora.rslora else k)",
        "fused_rank, fused_alpha = k * lora.r, lora.alpha",
        (FAMILIES + "test_slices_beside_other_targets_export_with_peft_rank_and_alpha_patterns",),
    ),
    Sabotage(
        "head: a fresh hidden layer left random under --head lora",
        "lora/model.py",
        "        if not layer.weight.is_meta:\n",
        "        if False:\n",
        (FAMILIES + "test_the_head_choices_on_deberta_whose_pooler_the_checkpoint_lacks",),
    ),
    Sabotage(
        "head: the loading report ignored",
        "lora/classifier.py",
        "model.fresh_parameters = tuple(sorted(fresh & parameters))",
        "model.fresh_parameters = ()",
        (FAMILIES + "test_the_head_choices_on_deberta_whose_pooler_the_checkpoint_lacks",),
    ),
]


def copy_repository(destination: Path) -> None:
    """The tracked and the untracked-but-not-ignored files: the working tree as it is."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, destination / name)


def caught(sabotage: Sabotage, copy: Path) -> bool:
    """Apply the sabotage in ``copy``, run its tests, restore; True when a test failed."""
    path = copy / sabotage.file
    text = path.read_text()
    if text.count(sabotage.original) != 1:
        raise SystemExit(
            f"sabotage {sabotage.name!r}: the code it breaks is not in {sabotage.file} "
            "exactly once; update tests/sabotage.py"
        )
    path.write_text(text.replace(sabotage.original, sabotage.broken))
    try:
        # No per-test time limit here: a test that fails only by running slow would count as caught.
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:timeout", *sabotage.tests],
            cwd=copy,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(text)
    if result.returncode < 0:  # a signal the sabotaged code no longer handles ended pytest itself
        return True
    if result.returncode not in (0, 1):
        raise SystemExit(f"sabotage {sabotage.name!r}: pytest could not run:\n{result.stdout[-2000:]}")
    return result.returncode == 1


def main(words: list[str]) -> int:
    chosen = [s for s in SABOTAGES if not words or any(w.lower() in s.name.lower() for w in words)]
    missed = 0
    with tempfile.TemporaryDirectory(prefix="sabotage-") as folder:
        copy = Path(folder)
        copy_repository(copy)
        for sabotage in chosen:
            started = time.perf_counter()
            ok = caught(sabotage, copy)
            missed += not ok
            guard = ", ".join(test.split("::")[-1] for test in sabotage.tests)
            print(
                f"{'caught' if ok else 'MISSED'}  {sabotage.name}  <- {guard}  ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    print(f"{len(chosen) - missed} of {len(chosen)} sabotages caught")
    return missed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
