"""benchmarks/gpu_check.py: the smoke run (tiny size, CPU) runs every piece without a failure and writes its
results, so the one-command GPU check cannot rot between GPU loans; on a CUDA machine (`-m gpu`), each piece runs
at full size."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.slow  # ~25 s on 2 loaded cores (10 s of CPU)
def test_the_smoke_check_runs_every_piece_and_writes_json_and_markdown(tmp_path):
    report = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    pieces = report["pieces"]
    assert list(pieces) == list(gpu_check.PIECES)
    failed = {name: piece["error"] for name, piece in pieces.items() if "error" in piece}
    assert not failed, failed
    assert [row["micro"] for row in pieces["sft"]["rows"]] == [1, 4]
    assert all(
        row["samples_s"] > 0 and row["tokens_s"] > 0 for row in pieces["sft"]["rows"] + pieces["dpo"]["rows"]
    )
    assert pieces["long"]["rows"][0]["seq"] == gpu_check.SMOKE_LONG_TOKENS
    for comparison in ("attention", "precision"):
        assert 0.5 < pieces[comparison]["top1_agree"] <= 1.0 and pieces[comparison]["positions"] > 0
    assert pieces["precision"]["max_abs"] > 0  # bf16 rounding shows: the two runs are really different
    saved = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert saved["pieces"]["sft"]["rows"] == json.loads(json.dumps(pieces["sft"]["rows"]))
    table = (tmp_path / "gpu_check_smoke.md").read_text()
    assert "| sft | sdpa | 4 |" in table and "| precision | bf16 weights" in table


def test_a_failing_piece_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(args, peak):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setitem(gpu_check.RUNNERS, "attention", broken)
    report = gpu_check.main(["--smoke", "--only", "attention,precision", "--out", str(tmp_path)])
    assert report["pieces"]["attention"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "max_abs" in report["pieces"]["precision"]
    assert "FAILED: RuntimeError" in (tmp_path / "gpu_check_smoke.md").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("piece", gpu_check.PIECES)
def test_each_piece_runs_at_full_size_on_the_gpu(piece, tmp_path):
    report = gpu_check.main(["--only", piece, "--out", str(tmp_path)])
    result = report["pieces"][piece]
    assert "error" not in result, result.get("traceback")
    if "rows" in result:
        assert all(row["peak_gb"] > 0 and row["samples_s"] > 0 for row in result["rows"])
