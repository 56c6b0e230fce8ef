"""Golden numbers recorded by tests/models/golden/record_phi3v_golden.py (see its docstring for what they lock and why)."""

import json
from pathlib import Path

import pytest
import torch

from tests.models.golden.record_phi3v_golden import image_records, tiny_records

GOLDEN = json.loads((Path(__file__).parent / "golden" / "phi3v_tiny.json").read_text())


@pytest.mark.parametrize("index", range(len(GOLDEN["images"])))
def test_crops_and_token_counts_are_unchanged(index):
    expected = GOLDEN["images"][index]
    assert image_records()[index] == expected  # exact: crops are integer pixels


def test_tiny_model_outputs_are_unchanged():
    got, expected = tiny_records(), GOLDEN["tiny_model"]
    atol = GOLDEN["tolerances"]["logits_atol"]
    assert got["input_ids"] == expected["input_ids"]
    torch.testing.assert_close(
        torch.tensor(got["last_logits_first_16"]),
        torch.tensor(expected["last_logits_first_16"]),
        rtol=0,
        atol=atol,
    )
    torch.testing.assert_close(
        torch.tensor(got["logits_sum_per_position_every_7th"]),
        torch.tensor(expected["logits_sum_per_position_every_7th"]),
        rtol=0,
        atol=atol * 100,
    )
    assert got["greedy"] == expected["greedy"]
