"""The end-of-run summary (eval/summary.py): scores of every stage, skipped rows per stage, report and weights."""

import json

from eval.summary import run_summary
from rundir.layout import adapter_dir, eval_dir, merged_dir, summary_file


def test_the_summary_lists_scores_skips_and_paths(tmp_path):
    eval_dir(tmp_path).mkdir(parents=True)
    (eval_dir(tmp_path) / "results.json").write_text(
        json.dumps({"synthetic": {"accuracy": {"base": 0.25, "sft": 0.5, "dpo": 0.625}}})
    )
    (eval_dir(tmp_path) / "report.html").write_text("<html></html>")
    for stage, skipped in (
        ("sft", {"a.jsonl:train": {"image cannot be decoded": 2, "missing column": 1}}),
        ("dpo", {}),
    ):
        adapter_dir(tmp_path, stage).mkdir(parents=True)
        (adapter_dir(tmp_path, stage) / "adapter_config.json").write_text("{}")
        summary_file(tmp_path, stage).write_text(json.dumps({"steps": 3, "skipped_rows": skipped}))
    merged_dir(tmp_path, "dpo").mkdir()
    (merged_dir(tmp_path, "dpo") / "config.json").write_text("{}")
    text = run_summary(tmp_path)
    assert "synthetic  accuracy  0.2500  0.5000  0.6250" in text
    assert "sft: 3 rows skipped (a.jsonl:train: image cannot be decoded 2, missing column 1)" in text
    assert "dpo: 0 rows skipped" in text
    assert f"report: {eval_dir(tmp_path) / 'report.html'}" in text
    assert (
        f"dpo merged: {merged_dir(tmp_path, 'dpo')}" in text
        and f"sft adapter: {adapter_dir(tmp_path, 'sft')}" in text
    )
