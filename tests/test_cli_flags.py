"""Every CLI flag has a test of its effect: FLAG_TESTS maps each (command, flag) of the click app to the tests that
check what it does; test_every_flag_has_an_effect_test walks the app and fails on a flag without one (so a flag
added later fails until its test is written). The effect tests that were missing follow the table."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from fps_graph.formats.masks import load_indices, read_metadata
from fps_graph.formats.stats import Stats
from fps_graph_cli.main import all_commands, cli, entry

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SAMPLE = ROOT / "samples" / "tiny_hybrid.onnx"
IMAGES = ROOT / "samples" / "images"
HERE = "test_cli_flags.py"

# (command, flag) -> tests that check the flag's effect ("file.py::test_name"; "" for a test of this file)
FLAG_TESTS: dict[tuple[str, str], list[str]] = {
    ("", "--debug"): ["test_errors.py::test_cli_one_line_and_debug_shows_the_cause"],
    ("", "--version"): [f"{HERE}::test_version"],
    ("inspect", "--json"): ["test_cli.py::test_inspect_json", "test_api.py::test_inspect_is_the_cli_view"],
    ("inspect", "--state-dict"): [f"{HERE}::test_state_dict_names_weights_by_value"],
    ("inspect", "--masks"): ["test_unreached.py::test_untaken_branch_weights_are_named_everywhere",
                             "test_unreached.py::test_inspect_masks_of_another_model_is_refused"],
    ("select", "--output"): ["test_cli.py::test_select_on_sample_images"],
    ("select", "--score"): ["test_cli.py::test_stats_out_then_stats_in_and_wanda", f"{HERE}::test_score_and_stat"],
    ("select", "--stat"): [f"{HERE}::test_score_and_stat"],
    ("select", "--k"): ["test_cli.py::test_select_on_sample_images"],
    ("select", "--budget"): ["test_cli.py::test_budget_network_on_sample"],
    ("select", "--granularity"): ["test_cli.py::test_budget_network_on_sample",
                                  "test_rough_edges.py::test_network_budget_warns_and_counts_empty_tensors"],
    ("select", "--min-per-layer"): ["test_rough_edges.py::test_network_budget_warns_and_counts_empty_tensors"],
    ("select", "--include"): [f"{HERE}::test_include_and_exclude",
                              "test_lm_path.py::test_pattern_matching_nothing_is_an_error"],
    ("select", "--exclude"): [f"{HERE}::test_include_and_exclude",
                              "test_lm_path.py::test_pattern_matching_nothing_is_an_error"],
    ("select", "--anchor"): [f"{HERE}::test_anchor_eps_and_anchor_stats"],
    ("select", "--anchor-stats"): [f"{HERE}::test_anchor_eps_and_anchor_stats",
                                   "test_rough_edges.py::test_anchor_with_anchor_stats_is_refused"],
    ("select", "--eps"): [f"{HERE}::test_anchor_eps_and_anchor_stats"],
    ("select", "--seed"): [f"{HERE}::test_seed_and_shuffle"],
    ("select", "--batch-size"): [f"{HERE}::test_batch_size_max_samples_and_quiet",
                                 "test_ray.py::test_grouping_shows_in_the_bytes"],
    ("select", "--max-samples"): [f"{HERE}::test_batch_size_max_samples_and_quiet"],
    ("select", "--shuffle"): [f"{HERE}::test_seed_and_shuffle"],
    ("select", "--image-size"): [f"{HERE}::test_image_preparation", "test_train.py::test_cli_train_on_sample_images"],
    ("select", "--mean"): [f"{HERE}::test_image_preparation"],
    ("select", "--std"): [f"{HERE}::test_image_preparation"],
    ("select", "--crop-pct"): [f"{HERE}::test_image_preparation"],
    ("select", "--tokenizer"): ["test_text.py::test_bad_text_inputs_one_line_exit_2_nothing_written",
                                "test_hf_train.py::test_train_follows_the_masks_text_record"],
    ("select", "--text-field"): ["test_text.py::test_jsonl_folder_equals_txt"],
    ("select", "--max-length"): ["test_text.py::test_metadata_records_the_tokenizer",
                                 "test_text.py::test_bad_text_inputs_one_line_exit_2_nothing_written"],
    ("select", "--no-truncate"): ["test_text.py::test_bad_text_inputs_one_line_exit_2_nothing_written"],
    ("select", "--pack"): ["test_pack.py::test_pack_flag_writes_packed_rows",
                           "test_pack.py::test_pack_bad_inputs_one_line_exit_2"],
    ("select", "--reduce"): [f"{HERE}::test_reduce_opt_level_and_threads"],
    ("select", "--provider"): ["test_robustness.py::test_cuda_requested_without_gpu_is_refused",
                               f"{HERE}::test_reduce_opt_level_and_threads"],
    ("select", "--opt-level"): [f"{HERE}::test_reduce_opt_level_and_threads"],
    ("select", "--threads"): [f"{HERE}::test_reduce_opt_level_and_threads"],
    ("select", "--max-memory"): ["test_micro.py::test_cli_max_memory_same_masks",
                                 "test_micro.py::test_cli_bad_max_memory"],
    ("select", "--dense"): ["test_cli.py::test_select_on_sample_images"],
    ("select", "--stats-out"): ["test_cli.py::test_stats_out_then_stats_in_and_wanda"],
    ("select", "--stats-in"): ["test_cli.py::test_stats_out_then_stats_in_and_wanda",
                               "test_rough_edges.py::test_stats_in_with_data_is_refused_and_repeated_flag_sums"],
    ("select", "--static"): ["test_static_inputs.py::test_cli_static_option"],
    ("select", "--state-dict"): [f"{HERE}::test_state_dict_names_weights_by_value"],
    ("select", "--force"): ["test_cli.py::test_existing_output_needs_force"],
    ("select", "--quiet"): [f"{HERE}::test_batch_size_max_samples_and_quiet"],
    ("select", "--ray"): ["test_ray.py::test_resume_after_driver_kill", "test_ray.py::test_without_ray_one_line",
                          "test_ray.py::test_ray_before_model_is_not_swallowed",
                          "test_ray.py::test_failed_start_leaves_nothing_and_the_same_command_works_after"],
    ("select", "--workers"): ["test_ray.py::test_byte_identical_for_any_worker_count",
                              "test_ray.py::test_resume_refuses_another_job"],
    ("select", "--workdir"): ["test_ray.py::test_resume_after_driver_kill"],
    ("select", "--resume"): ["test_ray.py::test_resume_after_driver_kill"],
    ("select", "--shard-size"): ["test_ray.py::test_grouping_shows_in_the_bytes"],
    ("apply", "--output"): [f"{HERE}::test_apply_flags"],
    ("apply", "--no-check"): [f"{HERE}::test_apply_flags"],
    ("apply", "--force"): [f"{HERE}::test_apply_flags"],
    ("apply", "--quiet"): [f"{HERE}::test_apply_flags"],
    ("export", "--weights"): ["test_export.py::test_export_records_weight_map"],
    ("export", "--input-shape"): [f"{HERE}::test_export_flags"],
    ("export", "--output"): ["test_export.py::test_export_records_weight_map"],
    ("export", "--exporter"): ["test_export.py::test_export_records_weight_map"],
    ("export", "--dynamic-batch/--static-batch"): [f"{HERE}::test_export_flags"],
    ("export", "--opset"): [f"{HERE}::test_export_flags"],
    ("export", "--input-name"): [f"{HERE}::test_export_flags"],
    ("export", "--fold/--no-fold"): ["test_export.py::test_default_export_keeps_module_weights_for_budgets"],
    ("export", "--force"): [f"{HERE}::test_export_flags"],
    ("compare", "--train"): ["test_compare.py::test_tables_hold_the_runs_own_numbers"],
    ("compare", "--val"): ["test_compare.py::test_learning_rates_are_chosen_on_validation_then_seeds_run_there"],
    ("compare", "--test"): ["test_compare.py::test_tables_hold_the_runs_own_numbers"],
    ("compare", "--task"): ["test_compare.py::test_causal_lm_reports_perplexity_on_validation"],
    ("compare", "--budget"): ["test_compare.py::test_selections_have_equal_counts_and_lora_matches_them"],
    ("compare", "--methods"): ["test_compare.py::test_learning_rates_are_chosen_on_validation_then_seeds_run_there",
                               "test_compare.py::test_force_replaces_a_run_folder"],
    ("compare", "--lrs"): ["test_compare.py::test_learning_rates_are_chosen_on_validation_then_seeds_run_there"],
    ("compare", "--seeds"): ["test_compare.py::test_learning_rates_are_chosen_on_validation_then_seeds_run_there"],
    ("compare", "--epochs"): ["test_compare.py::test_epochs_batch_size_and_max_samples_set_the_steps"],
    ("compare", "--batch-size"): ["test_compare.py::test_epochs_batch_size_and_max_samples_set_the_steps"],
    ("compare", "--max-samples"): ["test_compare.py::test_epochs_batch_size_and_max_samples_set_the_steps"],
    ("compare", "--max-length"): ["test_compare.py::test_fps_masks_are_what_select_writes"],
    ("compare", "--text-field"): ["test_compare.py::test_fps_masks_are_what_select_writes"],
    ("compare", "--label-field"): ["test_compare.py::test_selections_have_equal_counts_and_lora_matches_them"],
    ("compare", "--threads"): ["test_compare.py::test_results_record_commit_machine_load_and_threads"],
    ("compare", "--output"): ["test_compare.py::test_tables_hold_the_runs_own_numbers"],
    ("compare", "--force"): ["test_compare.py::test_force_replaces_a_run_folder"],
    ("compare", "--quiet"): ["test_compare.py::test_quiet_prints_only_the_summary"],
    ("export", "--task"): ["test_hf_export.py::test_cli_export_and_refusals",
                           "test_hf_export.py::test_seq_cls_from_causal_lm_checkpoint_warns_and_is_deterministic"],
    ("export", "--cache/--no-cache"): ["test_hf_export.py::test_cache_export_same_masks"],
    ("export", "--check/--no-check"): ["test_hf_export.py::test_check_refuses_a_mismatch_and_no_check_skips_it"],
}

# `train` (training half of issue 17, helper `loop`): the tests of its flags' effects
TRAIN, FLAGS, HF, PEFT = "test_train.py::", "test_train_flags.py::", "test_hf_train.py::", "test_peft.py::"
FLAG_TESTS.update({
    ("train", "--weights"): [TRAIN + "test_cli_train_on_sample_images"],
    ("train", "--masks"): [TRAIN + "test_cli_train_on_sample_images",
                           TRAIN + "test_masks_from_another_model_are_a_clear_error"],
    ("train", "--data"): [TRAIN + "test_cli_train_on_sample_images",
                          TRAIN + "test_image_folders_need_class_subfolders"],
    ("train", "--val"): [FLAGS + "test_label_smoothing_changes_the_loss_as_cross_entropy_says",
                         TRAIN + "test_cli_train_on_sample_images"],
    ("train", "--output"): [TRAIN + "test_cli_train_on_sample_images",
                            TRAIN + "test_failed_train_leaves_no_run_folder"],
    ("train", "--epochs"): [FLAGS + "test_warmup_epochs_and_min_lr_shape_the_schedule",
                            FLAGS + "test_batch_size_and_max_samples_set_the_steps"],
    ("train", "--lr"): [FLAGS + "test_warmup_epochs_and_min_lr_shape_the_schedule"],
    ("train", "--warmup-epochs"): [FLAGS + "test_warmup_epochs_and_min_lr_shape_the_schedule"],
    ("train", "--min-lr"): [FLAGS + "test_warmup_epochs_and_min_lr_shape_the_schedule"],
    ("train", "--batch-size"): [FLAGS + "test_batch_size_and_max_samples_set_the_steps"],
    ("train", "--max-samples"): [FLAGS + "test_batch_size_and_max_samples_set_the_steps"],
    ("train", "--optimizer"): [TRAIN + "test_optimizer_weight_decay_and_clip_give_torch_optims_update",
                               HF + "test_hf_grad_clip_bounds_the_step_and_optimizer_is_sgd"],
    ("train", "--weight-decay"): [TRAIN + "test_optimizer_weight_decay_and_clip_give_torch_optims_update",
                                  TRAIN + "test_weight_decay_changes_only_trained_entries_and_shrinks_them"],
    ("train", "--grad-clip"): [TRAIN + "test_grad_clip_bounds_the_step_of_every_trained_value",
                               HF + "test_hf_grad_clip_bounds_the_step_and_optimizer_is_sgd"],
    ("train", "--label-smoothing"): [FLAGS + "test_label_smoothing_changes_the_loss_as_cross_entropy_says"],
    ("train", "--seed"): [FLAGS + "test_seed_orders_the_data"],
    ("train", "--num-classes"): [TRAIN + "test_new_head_and_save_merged"],
    ("train", "--save-merged"): [TRAIN + "test_new_head_and_save_merged"],
    ("train", "--head"): [FLAGS + "test_what_trains_in_full"],
    ("train", "--train-bias/--no-train-bias"): [FLAGS + "test_what_trains_in_full"],
    ("train", "--train-head/--no-train-head"): [TRAIN + "test_export_select_train_needs_no_image_size"],
    ("train", "--train-norms"): [FLAGS + "test_what_trains_in_full"],
    ("train", "--train-embeddings"): [FLAGS + "test_what_trains_in_full"],
    ("train", "--train-full"): [FLAGS + "test_what_trains_in_full"],
    ("train", "--image-size"): [TRAIN + "test_export_select_train_needs_no_image_size",
                                TRAIN + "test_masks_without_a_record_ask_for_the_image_size"],
    ("train", "--mean"): [FLAGS + "test_image_preparation_flags_override_select"],
    ("train", "--std"): [FLAGS + "test_image_preparation_flags_override_select"],
    ("train", "--crop-pct"): [FLAGS + "test_image_preparation_flags_override_select"],
    ("train", "--task"): [FLAGS + "test_task_is_checked_once_with_the_known_names",
                          HF + "test_seq_cls_new_seeded_head_and_only_selected_move"],
    ("train", "--text-field"): [FLAGS + "test_text_and_label_fields"],
    ("train", "--label-field"): [FLAGS + "test_text_and_label_fields"],
    ("train", "--prompt-field"): [FLAGS + "test_prompt_and_completion_fields"],
    ("train", "--completion-field"): [FLAGS + "test_prompt_and_completion_fields"],
    ("train", "--tokenizer"): [FLAGS + "test_tokenizer_flag_is_the_tokenizer_used"],
    ("train", "--max-length"): [HF + "test_bad_inputs_are_one_line_errors_and_leave_nothing",
                                HF + "test_train_follows_the_masks_text_record"],
    ("train", "--gradient-checkpointing"): [FLAGS + "test_gradient_checkpointing_gives_the_same_training"],
    ("train", "--peft"): [PEFT + "test_cli_peft_run_loads_in_peft_and_refuses_tied_heads_before_training",
                          PEFT + "test_factory_run_with_peft_loads_in_peft"],
    ("train", "--no-plot"): [FLAGS + "test_no_plot_quiet_force_threads_device"],
    ("train", "--quiet"): [FLAGS + "test_no_plot_quiet_force_threads_device"],
    ("train", "--force"): [FLAGS + "test_no_plot_quiet_force_threads_device"],
    ("train", "--threads"): [FLAGS + "test_no_plot_quiet_force_threads_device"],
    ("train", "--device"): [FLAGS + "test_no_plot_quiet_force_threads_device"],
    ("train", "--step-scale"): [FLAGS + "test_step_scale_sets_each_entrys_step"],
})

# flags whose effect test is still being written (none now); a flag in neither table fails the check
PENDING: set[tuple[str, str]] = set()


def _flag(param) -> str:
    longs = [o for o in param.opts if o.startswith("--")] + [o for o in param.secondary_opts if o.startswith("--")]
    return "/".join(longs)


def app_flags() -> set[tuple[str, str]]:
    """(command, flag) for every option of the app ("" for the group's own), help excluded."""
    out = {("", _flag(p)) for p in cli.params if _flag(p) and "--help" not in p.opts}
    out.add(("", "--version"))
    for name, cmd in all_commands().items():
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option" and "--help" not in p.opts:
                out.add((name, _flag(p)))
    return out


def _test_names(file: str) -> set[str]:
    tree = ast.parse((TESTS / file).read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_every_flag_has_an_effect_test():
    flags = app_flags()
    missing = sorted(f for f in flags if f not in FLAG_TESTS and f not in PENDING)
    assert not missing, f"flags without an effect test (add one and list it in FLAG_TESTS): {missing}"
    stale = sorted(f for f in FLAG_TESTS if f not in flags)
    assert not stale, f"FLAG_TESTS names flags the app no longer has: {stale}"
    stale_pending = sorted(f for f in PENDING if f in FLAG_TESTS)
    assert not stale_pending, f"listed in FLAG_TESTS now, remove from PENDING: {stale_pending}"
    for key, tests in FLAG_TESTS.items():
        assert tests, key
        for t in tests:
            file, _, name = t.partition("::")
            assert (TESTS / file).is_file() and name in _test_names(file), f"{key}: no test {t}"


def test_the_walk_sees_a_new_flag(monkeypatch):
    """A flag added to a command without a table entry is reported."""
    import click

    cmd = all_commands()["inspect"]
    monkeypatch.setattr(cmd, "params", cmd.params + [click.Option(["--brand-new"], is_flag=True)])
    assert ("inspect", "--brand-new") in app_flags() - set(FLAG_TESTS)


# --- helpers ------------------------------------------------------------------------------------------------------


def run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    code = entry([str(a) for a in args])
    return code, capsys.readouterr().err


def sel(capsys, tmp: Path, name: str, *args, data=IMAGES) -> Path:
    out = tmp / f"{name}.safetensors"
    code, err = run(capsys, "select", SAMPLE, *([data] if data else []), "-o", out, "-q", "--batch-size", "16",
                    "--provider", "cpu", *args)
    assert code == 0, err
    return out


def indices(path: Path) -> dict[str, list[int]]:
    return {k: v.tolist() for k, v in load_indices(path).items()}


# --- select -------------------------------------------------------------------------------------------------------


def test_version(capsys):
    code, _ = run(capsys, "--version")
    assert code == 0


def test_score_and_stat(tmp_path, capsys):
    """--stat l2 turns fps into |W| * sqrt(E x^2), which is wanda's score: the same entries; the default differs."""
    fps = sel(capsys, tmp_path, "fps", "--k", "3", "--max-samples", "32")
    fps_l2 = sel(capsys, tmp_path, "fps_l2", "--k", "3", "--max-samples", "32", "--stat", "l2")
    wanda = sel(capsys, tmp_path, "wanda", "--k", "3", "--max-samples", "32", "--score", "wanda")
    assert indices(fps_l2) == indices(wanda) and indices(fps) != indices(wanda)
    assert read_metadata(fps_l2)["stat"] == "l2" and read_metadata(fps)["stat"] == "mean-abs"
    assert read_metadata(wanda)["score"] == "wanda"
    code, err = run(capsys, "select", SAMPLE, IMAGES, "-o", tmp_path / "x.safetensors", "--score", "wanda",
                    "--stat", "mean-abs")
    assert code == 2 and "--score wanda uses the l2 statistic" in err


def test_include_and_exclude(tmp_path, capsys):
    every = set(indices(sel(capsys, tmp_path, "all", "--score", "magnitude", data=None)))
    inc = sel(capsys, tmp_path, "inc", "--score", "magnitude", "--include", "blocks.0.*", "--include", "head*",
              data=None)
    exc = sel(capsys, tmp_path, "exc", "--score", "magnitude", "--exclude", "blocks.*", data=None)
    want_inc = {k for k in every if k.startswith("blocks.0.") or k.startswith("head")}
    assert set(indices(inc)) == want_inc and 0 < len(want_inc) < len(every)
    assert set(indices(exc)) == {k for k in every if not k.startswith("blocks.")}
    for key in want_inc:                                        # the kept tensors select what they did
        assert indices(inc)[key] == indices(tmp_path / "all.safetensors")[key]


def test_anchor_eps_and_anchor_stats(tmp_path, capsys):
    """gd-fps = |W| E_data|x| / (E_anchor|x| + eps): a huge eps leaves fps's order; the anchor given as data or as
    its saved statistics gives the same masks; the anchor's statistics enter (a small eps differs from fps)."""
    anchor_stats = tmp_path / "anchor.stats"
    sel(capsys, tmp_path, "anchor_run", "--max-samples", "48", "--stats-out", anchor_stats)
    args = ("--score", "gd-fps", "--k", "2", "--max-samples", "48")
    fps = sel(capsys, tmp_path, "fps", "--k", "2", "--max-samples", "48")
    big = sel(capsys, tmp_path, "big", *args, "--anchor", IMAGES, "--eps", "1e30")
    assert indices(big) == indices(fps)
    small_data = sel(capsys, tmp_path, "small_data", *args, "--anchor", IMAGES, "--eps", "1e-6")
    assert indices(small_data) != indices(fps)
    small_stats = sel(capsys, tmp_path, "small_stats", *args, "--anchor-stats", anchor_stats, "--eps", "1e-6")
    assert indices(small_stats) == indices(small_data)
    assert read_metadata(small_stats)["anchor_samples"] == read_metadata(small_data)["anchor_samples"] == 48


def test_seed_and_shuffle(tmp_path, capsys):
    a = sel(capsys, tmp_path, "a", "--score", "random", "--seed", "1", data=None)
    b = sel(capsys, tmp_path, "b", "--score", "random", "--seed", "1", data=None)
    c = sel(capsys, tmp_path, "c", "--score", "random", "--seed", "2", data=None)
    assert indices(a) == indices(b) != indices(c)
    plain = tmp_path / "plain.stats"
    shuffled = tmp_path / "shuffled.stats"
    sel(capsys, tmp_path, "p", "--max-samples", "16", "--stats-out", plain)
    sel(capsys, tmp_path, "s", "--max-samples", "16", "--shuffle", "--stats-out", shuffled)
    p, s = Stats.load(plain), Stats.load(shuffled)
    assert p.num_samples == s.num_samples == 16
    node = next(iter(p.sums))
    assert not np.allclose(p.sums[node]["abs"], s.sums[node]["abs"])        # other images were read
    every = tmp_path / "every.stats"
    sel(capsys, tmp_path, "e", "--shuffle", "--stats-out", every)           # all images, in another order
    full = tmp_path / "full.stats"
    sel(capsys, tmp_path, "f", "--stats-out", full)
    # float32 sums in the graph, grouped otherwise: equal to float32 rounding
    np.testing.assert_allclose(Stats.load(every).sums[node]["abs"], Stats.load(full).sums[node]["abs"], rtol=1e-5)


def test_batch_size_max_samples_and_quiet(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, "select", SAMPLE, IMAGES, "-o", out, "--batch-size", "8", "--max-samples", "24",
                    "--provider", "cpu")
    assert code == 0 and "selected" in err and "24 samples" in err            # the summary line, without -q
    meta = read_metadata(out)
    assert meta["num_samples"] == 24 and meta["options"]["batch_size"] == 8 and meta["options"]["max_samples"] == 24
    code, err = run(capsys, "select", SAMPLE, IMAGES, "-o", tmp_path / "q.safetensors", "--quiet")
    assert code == 0 and err == ""


def test_image_preparation(tmp_path, capsys):
    """--mean, --std, --crop-pct are recorded and change the statistics; --image-size must fit a fixed input."""
    base = tmp_path / "base.stats"
    sel(capsys, tmp_path, "base", "--max-samples", "16", "--stats-out", base)
    node = next(iter(Stats.load(base).sums))
    for flag, value, field, want in (("--mean", "0.2,0.3,0.4", "mean", [0.2, 0.3, 0.4]),
                                     ("--std", "0.5", "std", [0.5]), ("--crop-pct", "0.5", "crop_pct", 0.5)):
        st = tmp_path / f"{field}.stats"
        out = sel(capsys, tmp_path, field, "--max-samples", "16", flag, value, "--stats-out", st)
        assert read_metadata(out)["data"][field] == want, field
        assert not np.allclose(Stats.load(st).sums[node]["abs"], Stats.load(base).sums[node]["abs"]), field
    code, err = run(capsys, "select", SAMPLE, IMAGES, "-o", tmp_path / "x.safetensors", "--image-size", "16")
    assert code == 2 and "--image-size asks for 16x16" in err


def test_reduce_opt_level_and_threads(tmp_path, capsys, monkeypatch):
    """The runtime flags reach the ONNX Runtime session (its options read back), and host reduction gives the
    in-graph sums."""
    import fps_graph.runtime.calibrate as calibrate

    seen = []
    real = calibrate.create_session

    def spy(*args, **kwargs):
        s = real(*args, **kwargs)
        seen.append(s.session.get_session_options())
        return s

    monkeypatch.setattr(calibrate, "create_session", spy)
    graph_stats, host_stats = tmp_path / "g.stats", tmp_path / "h.stats"
    sel(capsys, tmp_path, "g", "--max-samples", "16", "--stats-out", graph_stats, "--opt-level", "basic",
        "--threads", "1")
    host = sel(capsys, tmp_path, "h", "--max-samples", "16", "--stats-out", host_stats, "--reduce", "host")
    import onnxruntime as ort

    assert seen[0].graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert seen[0].intra_op_num_threads == 1
    assert seen[1].graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert read_metadata(host)["options"]["reduce"] == "host"
    g, h = Stats.load(graph_stats), Stats.load(host_stats)
    for node in g.sums:
        np.testing.assert_allclose(h.sums[node]["abs"], g.sums[node]["abs"], rtol=1e-5)


def _bare_model(path: Path) -> dict[str, np.ndarray]:
    """x -> MatMul(generated weight name, unnamed node) -> Relu -> MatMul: nothing in the graph names the weights."""
    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((6, 8)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["h"]),
                           helper.make_node("Relu", ["h"], ["r"]),
                           helper.make_node("MatMul", ["r", "onnx::MatMul_9"], ["y"])], "bare",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w1, "onnx::MatMul_7"),
                           numpy_helper.from_array(w2, "onnx::MatMul_9")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return {"enc.weight": np.ascontiguousarray(w1.T), "dec.weight": np.ascontiguousarray(w2.T)}   # Linear layout


def test_state_dict_names_weights_by_value(tmp_path, capsys):
    sd = _bare_model(tmp_path / "bare.onnx")
    save_file(sd, str(tmp_path / "sd.safetensors"))
    capsys.readouterr()
    assert entry(["inspect", str(tmp_path / "bare.onnx"), "--json"]) == 0
    before = {l["name"] for l in json.loads(capsys.readouterr().out)["layers"]}
    assert entry(["inspect", str(tmp_path / "bare.onnx"), "--json", "--state-dict",
                  str(tmp_path / "sd.safetensors")]) == 0
    view = json.loads(capsys.readouterr().out)
    assert {l["name"] for l in view["layers"]} == {"enc.weight", "dec.weight"} != before
    assert {l["name_source"] for l in view["layers"]} == {"value-match"}
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32))
    out = tmp_path / "m.safetensors"
    code, err = run(capsys, "select", tmp_path / "bare.onnx", tmp_path / "x.npy", "-o", out, "-q", "--state-dict",
                    tmp_path / "sd.safetensors")
    assert code == 0, err
    masks = load_indices(out)
    assert set(masks) == {"enc.weight", "dec.weight"} and masks["enc.weight"].size == 8    # k=1 per output neuron


# --- apply --------------------------------------------------------------------------------------------------------


def test_apply_flags(tmp_path, capsys):
    from fps_graph.formats.delta import SparseEntry, write_delta

    model = onnx.load(str(SAMPLE))
    view = __import__("fps_graph").inspect(SAMPLE)
    layer = next(l for l in view["layers"] if l["op"] == "Conv")
    stored = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == layer["weight"])
    idx = np.array([2, 9], dtype=np.int64)
    wrong_base = stored.reshape(-1)[idx] + 1.0                     # not what the model holds
    for name, base in (("good", stored.reshape(-1)[idx]), ("other", wrong_base)):
        write_delta(tmp_path / f"{name}.safetensors",
                    {layer["name"]: SparseEntry(idx, np.array([1.0, -1.0], np.float32), base, stored.shape)}, {},
                    {layer["name"]: {"kind": "sparse", "shape": list(stored.shape), "dtype": "float32"}}, {}, {})
    out = tmp_path / "out.onnx"
    code, err = run(capsys, "apply", SAMPLE, tmp_path / "good.safetensors", "--output", out)
    assert code == 0 and f"wrote {out}" in err and "1 tensors (1 sparse, 0 full)" in err
    code, err = run(capsys, "apply", SAMPLE, tmp_path / "good.safetensors", "-o", out)
    assert code == 2 and "exists" in err
    code, err = run(capsys, "apply", SAMPLE, tmp_path / "good.safetensors", "-o", out, "--force", "--quiet")
    assert code == 0 and err == ""
    code, err = run(capsys, "apply", SAMPLE, tmp_path / "other.safetensors", "-o", tmp_path / "o2.onnx")
    assert code == 2 and "does not hold the values training started from" in err
    assert not (tmp_path / "o2.onnx").exists()
    code, err = run(capsys, "apply", SAMPLE, tmp_path / "other.safetensors", "-o", tmp_path / "o2.onnx",
                    "--no-check", "-q")
    assert code == 0, err
    got = next(numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "o2.onnx")).graph.initializer
               if t.name == layer["weight"]).reshape(-1)
    # the trained change lands on what the model holds (a delta is a change, not a value)
    np.testing.assert_array_equal(got[idx], (stored.reshape(-1)[idx] + np.array([1.0, -1.0], np.float32)))


# --- export -------------------------------------------------------------------------------------------------------

TINY_PY = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
'''


def test_export_flags(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    (tmp_path / "tinymods.py").write_text(TINY_PY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "a.onnx"
    code, err = run(capsys, "export", "tinymods:build", "--input-shape", "2,6", "-o", out, "--exporter", "legacy",
                    "--static-batch", "--opset", "15", "--input-name", "features")
    assert code == 0, err
    proto = onnx.load(str(out))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert proto.graph.input[0].name == "features" and [d.dim_value for d in dims] == [2, 6]
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 15
    code, err = run(capsys, "export", "tinymods:build", "--input-shape", "2,6", "-o", out, "--exporter", "legacy")
    assert code == 2 and "exists" in err
    code, err = run(capsys, "export", "tinymods:build", "--input-shape", "2,6", "-o", out, "--exporter", "legacy",
                    "--dynamic-batch", "--force")
    assert code == 0, err
    proto = onnx.load(str(out))
    first = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert proto.graph.input[0].name == "input" and not first.HasField("dim_value")
    assert sys.modules.get("tinymods") is not None
