"""Fault injection tally: the bad-input corpus and the fault scenarios, and how many ended as expected.

    python benchmarks/bench_faults.py                 # corpus + scenario tests (a few minutes)
    python benchmarks/bench_faults.py --corpus-only   # the 19 bad-input cases only (~20 s)

The corpus is tests/fault_corpus.py (each case: broken input -> expected quarantine reasons or a
clear error). The scenarios are the fault tests run through pytest: SIGKILL at a named point inside
every stage then rerun (same artifacts), an interrupted promotion finished by its rerun, a second
run on a locked folder, a killed lock holder, a hostile checkpoint, NaN in training, memory and
spill exhaustion, a training killed mid-epoch that resumes to the same weights, and the decision
seams: an unreadable registry, a champion that moved or was rolled back, float16 refused, tiny
slices that must not gate, changed hash settings, chained look-alikes, DECIMAL columns, windows
without partitions, flat propensities and per-file CSV rows.
Last line: one JSON object {scenarios, passed, rows_in, rows_out, rows_quarantined}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fault_corpus import run_all  # noqa: E402

SCENARIOS = [
    "tests/test_faults.py::test_sigkill_at_named_points_of_each_stage_then_rerun_gives_the_same_artifacts",
    "tests/test_faults.py::test_a_hostile_lightning_checkpoint_is_refused_not_unpickled",
    "tests/test_faults.py::test_nan_stops_training_keeps_finite_weights_and_fails_the_gate",
    "tests/test_faults.py::test_too_little_memory_and_spill_space_is_a_clear_error",
    "tests/test_train.py::test_sigkill_mid_epoch_then_rerun_ends_with_the_same_weights",
    "tests/test_e2e.py::test_promotion_interrupted_before_the_alias_move_is_finished_by_the_rerun",
    # decisions at the registry seam and the gates (the trustworthy-decision issue)
    "tests/test_promote.py::test_a_registry_that_cannot_be_read_stops_instead_of_meaning_no_champion",
    "tests/test_promote.py::test_the_champion_moves_only_from_the_version_that_was_evaluated",
    "tests/test_promote.py::test_the_evaluated_champion_is_part_of_evaluates_fingerprint",
    "tests/test_e2e.py::test_promote_refuses_a_moved_champion_and_never_promotes_a_rolled_back_version",
    "tests/test_config.py::test_float16_precision_is_refused_with_what_to_use_instead",
    "tests/test_slices.py::test_a_one_query_slice_is_shown_but_never_blocks",
    "tests/test_slices.py::test_twenty_categories_without_a_difference_rarely_flag_any_slice",
    "tests/test_split.py::test_changed_hash_settings_need_the_migration_command",
    "tests/test_split.py::test_a_chain_of_look_alike_products_does_not_become_one_giant_group",
    "tests/test_extract.py::test_decimal_columns_only_stand_for_integers",
    "tests/test_extract.py::test_last_days_counts_back_from_the_newest_event_without_date_partitions",
    "tests/test_extract.py::test_flat_propensities_are_a_warning_and_the_applied_weighting_is_recorded",
    "tests/test_extract.py::test_csv_rows_are_numbered_within_each_file",
    # odd input, hostile input and a scheduler's life
    "tests/test_faults.py::test_sigterm_is_a_stop_not_a_success",
    "tests/test_faults.py::test_a_truncated_checkpoint_is_set_aside_and_training_restarts",
    "tests/test_config.py::test_run_ids_are_plain_names",
    "tests/test_config.py::test_promote_metric_must_be_one_evaluate_computes",
    "tests/test_config.py::test_resource_settings_change_no_fingerprint_and_no_default_run_id",
    "tests/test_promote.py::test_no_credentials_reach_the_terminal",
    "tests/test_extract.py::test_nanosecond_timestamps_as_pandas_writes_them",
    "tests/test_extract.py::test_window_dates_are_in_the_configured_zone_never_the_machines",
    "tests/test_extract.py::test_a_column_missing_from_one_partition_names_the_file",
    "tests/test_extract.py::test_a_partition_folder_that_is_not_a_date_names_the_folder",
    "tests/test_extract.py::test_events_and_images_in_two_duckdb_files",
    "tests/test_extract.py::test_text_that_is_not_utf8_names_the_file",
    "tests/test_images.py::test_paths_that_are_not_paths_are_quarantined_not_a_traceback",
    "tests/test_evaluate.py::test_an_image_deleted_after_split_is_left_out_not_a_crash",
    "tests/test_runs.py",  # locks, run folders and state folders that cannot be written, reuse across runs
    "tests/test_e2e.py::test_a_changed_gate_re_decides_and_a_changed_model_name_logs_to_a_fresh_mlflow_run",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = run_all(Path(folder))
    for r in results:
        print(("ok   " if r["passed"] else "FAIL ") + f"{r['case']}: {r['detail'][:160]}")
    scenarios, passed = len(results), sum(r["passed"] for r in results)
    if not args.corpus_only:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SCENARIOS],
                              cwd=ROOT, capture_output=True, text=True)
        tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|error)", tail)}
        print(f"fault scenarios through pytest: {tail}")
        scenarios += sum(counts.values())
        passed += counts.get("passed", 0)
    print(json.dumps({"scenarios": scenarios, "passed": passed, "rows_in": sum(r["rows_in"] for r in results),
                      "rows_out": sum(r["rows_out"] for r in results),
                      "rows_quarantined": sum(r["rows_quarantined"] for r in results)}))


if __name__ == "__main__":
    main()
