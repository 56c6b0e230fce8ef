"""eval/metrics.py against cases taken from the reference implementations' own code, docs and tests.

Each case names its source. Short names used below:
  pix2struct-test  google-research/pix2struct pix2struct/metrics_test.py (test_pix2struct_metrics)
  vqa-page         https://visualqa.org/evaluation.html (the official VQA evaluation description)
  vqaEval          GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py
  rrc-script       the official DocVQA/InfographicVQA ANLS script (infographicsvqa_eval.py, as in QwenLM/Qwen-VL)
  vlmeval-match    open-compass/VLMEvalKit vlmeval/utils/matching_util.py
  lmms-mcq         EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/_task_utils/mcq_extract.py and tasks/ai2d/utils.py
  pope-eval        AoiDragon/POPE evaluate.py
"""

import math

import pytest

from eval.metrics import (
    anls,
    exact_match,
    extract_choice,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    pope,
    pope_answer,
    relaxed_accuracy,
    vqa_accuracy,
)

# ---------------------------------------------------------------------------------------------------------------
# relaxed_accuracy (ChartQA)
# ---------------------------------------------------------------------------------------------------------------

# pix2struct-test: these eight pairs give relaxed_accuracy 62.5 (5 of 8) there.
PIX2STRUCT_PAIRS = [
    ("abc", "abc", 1.0),
    ("abc", "Abc", 1.0),
    ("Abc", "abc", 1.0),
    ("100%", "96%", 1.0),  # 1.00 vs 0.96: 4.2% off
    ("100%", "94%", 0.0),  # 6.4% off
    ("100%", "0.96", 1.0),  # "%" divides by 100, so percent and fraction compare
    ("100%", "0.94", 0.0),
    ("Don't", "Won't", 0.0),
]


@pytest.mark.parametrize(("prediction", "target", "expected"), PIX2STRUCT_PAIRS)
def test_relaxed_accuracy_matches_pix2struct_test_cases(prediction, target, expected):
    assert relaxed_accuracy(prediction, [target]) == expected


def test_relaxed_accuracy_pix2struct_dataset_mean_is_62_5_percent():
    scores = [relaxed_accuracy(p, [t]) for p, t, _ in PIX2STRUCT_PAIRS]
    assert sum(scores) / len(scores) == pytest.approx(0.625)


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("5%", "0.05", 1.0),  # pix2struct `_to_float`: trailing % -> /100
        ("0.05", "5%", 1.0),
        ("5", "5%", 0.0),  # 5 vs 0.05
        ("105", "100", 1.0),  # exactly 5% above: the bound is inclusive (`<=` in every reference)
        ("95", "100", 1.0),  # exactly 5% below
        ("105.1", "100", 0.0),
        ("94.9", "100", 0.0),
        ("-10.4", "-10", 1.0),  # relative change is taken against |target|
        ("10", "-10", 0.0),
        ("1,000", "1000", 0.0),  # float() rejects the comma: string comparison, and the strings differ
        ("1,000", "1,000", 1.0),
        ("1000", "1,000", 0.0),
        ("0", "0", 1.0),  # a zero target is falsy in the reference: string comparison
        ("0.0", "0", 0.0),
        ("0.001", "0", 0.0),
        ("1.5", "1.5", 1.0),
        ("1e3", "1000", 1.0),  # float() parses it
        ("", "5", 0.0),  # empty prediction
        ("", "Yes", 0.0),
        ("YES", "yes", 1.0),  # non-numeric: case-insensitive exact match
        ("Yes\n", "yes", 1.0),  # VLMEvalKit strips the prediction
        ("12%\n", "12%", 1.0),
    ],
)
def test_relaxed_accuracy_edge_cases(prediction, target, expected):
    assert relaxed_accuracy(prediction, [target]) == expected


def test_relaxed_accuracy_is_max_over_targets():
    assert relaxed_accuracy("abc", ["xyz", "ABC"]) == 1.0
    assert relaxed_accuracy("50", ["10", "20"]) == 0.0


def test_relaxed_accuracy_tolerance_is_a_parameter():
    assert relaxed_accuracy("110", ["100"], max_relative_change=0.1) == 1.0
    assert relaxed_accuracy("110", ["100"]) == 0.0


@pytest.mark.parametrize("targets", [[], "42"])
def test_relaxed_accuracy_refuses_empty_or_bare_string_targets(targets):
    with pytest.raises(ValueError, match="targets"):
        relaxed_accuracy("42", targets)


# ---------------------------------------------------------------------------------------------------------------
# vqa_accuracy (VQAv2 / TextVQA)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("dont", "don't"),  # vqa-page: "convert 'dont' to 'don't'"
        ("100,978", "100978"),  # vqa-page: no space for a comma between digits
        ("2:50 pm", "2:50 pm"),  # vqa-page: colons kept (times)
        ("girl's", "girl's"),  # vqa-page: apostrophes kept (possessives)
        ("Two", "2"),  # vqa-page: number words to digits, lowercase
        ("ten", "10"),
        ("none", "0"),  # vqaEval manualMap
        ("eleven", "eleven"),  # manualMap stops at ten
        ("The dog", "dog"),  # vqa-page: articles removed
        ("a man and an apple", "man and apple"),
        ("1.5", "1.5"),  # vqa-page: periods kept as decimals
        ("2.", "2"),  # vqaEval periodStrip: a period not followed by a digit goes, even after a digit
        ("yes.", "yes"),
        ("yes, it is", "yes it is"),  # vqaEval processPunctuation: a mark touching a space is deleted
        ("red,blue", "red blue"),  # otherwise replaced by a space
        ("(hello)", "hello"),
        ("left-handed", "left handed"),
        ("1,000?", "1000"),  # a digit-comma-digit deletes every mark
        ("isnt", "isn't"),  # vqaEval contractions table
        ("whats", "what's"),
        ("  Yes\n", "yes"),  # vqaEval: newlines/tabs to spaces, strip
    ],
)
def test_normalize_vqa_answer_follows_the_official_processing(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(
    ("humans_agreeing", "expected"),
    # vqaEval: mean over the 10 leave-one-out subsets of min(1, matches / 3).
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out_over_ten_answers(humans_agreeing, expected):
    answers = ["cat"] * humans_agreeing + ["dog"] * (10 - humans_agreeing)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_three_of_ten_computed_as_the_official_loop():
    # vqaEval: each of the 3 "2" annotators left out sees 2 matches (2/3); each of the other 7 sees 3 (1).
    answers = ["2", "2", "2", "3", "3", "3", "3", "4", "4", "4"]
    assert vqa_accuracy("2", answers) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_vqa_accuracy_normalizes_number_words_contractions_and_articles():
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 1.0  # answers are normalised too (vqa-page)
    assert vqa_accuracy("dont", ["don't"] * 10) == 1.0
    assert vqa_accuracy("The dog.", ["dog"] * 10) == 1.0
    assert vqa_accuracy("1.5", ["15"] * 10) == 0.0  # the decimal point is kept
    assert vqa_accuracy("Nokia", ["nokia"] * 10) == 1.0  # TextVQA answers are raw strings


def test_vqa_accuracy_with_fewer_than_ten_answers():
    assert vqa_accuracy("cat", ["Cat"]) == 1.0  # one answer: normalised exact match
    assert vqa_accuracy("dog", ["cat"]) == 0.0
    # Three answers [x, x, y]: full credit needs min(3, 2) = 2 matching others.
    assert vqa_accuracy("x", ["x", "x", "y"]) == pytest.approx((1 / 2 + 1 / 2 + 2 / 2) / 3)
    assert vqa_accuracy("x", ["x", "x", "x"]) == 1.0
    # Eleven answers keep the official denominator 3.
    assert vqa_accuracy("x", ["x"] * 3 + ["y"] * 8) == pytest.approx((3 * 2 / 3 + 8) / 11)


def test_vqa_accuracy_empty_prediction_scores_zero_against_real_answers():
    assert vqa_accuracy("", ["cat"] * 10) == 0.0


def test_vqa_accuracy_refuses_empty_answers():
    with pytest.raises(ValueError, match="answers is empty"):
        vqa_accuracy("cat", [])


# ---------------------------------------------------------------------------------------------------------------
# anls (DocVQA / InfographicVQA)
# ---------------------------------------------------------------------------------------------------------------


def test_anls_matches_pix2struct_test_mean_of_47_5_percent():
    # pix2struct-test lowercases both sides, then: three exact (1 each), four numeric pairs whose normalised
    # distance exceeds 0.5 (0 each), and "don't"/"won't" at distance 1 of 5 (0.8): (3 + 0.8) / 8 = 0.475.
    scores = [anls(p, [t]) for p, t, _ in PIX2STRUCT_PAIRS]
    assert scores[-1] == pytest.approx(0.8)
    assert sum(scores) / len(scores) == pytest.approx(0.475)


def test_anls_lowercases_strips_and_collapses_whitespace():
    # rrc-script: ' '.join(answer.strip().lower().split()) on both sides
    assert anls("  The   Cat ", ["the cat"]) == 1.0


def test_anls_threshold_boundary_is_kept():
    # rrc-script zeroes only `score < threshold`: distance 2 of 4 gives exactly 0.5, which stays.
    assert anls("abxy", ["abcd"]) == 0.5
    # distance 3 of 5 gives 0.4 < 0.5
    assert anls("abxyz", ["abcde"]) == 0.0
    assert anls("abcdx", ["abcde"], threshold=0.9) == 0.0  # 0.8 under a stricter threshold
    assert anls("abcdx", ["abcde"], threshold=0.8) == pytest.approx(0.8)


def test_anls_is_max_over_answers():
    assert anls("abd", ["xyz", "abc"]) == pytest.approx(2 / 3)


def test_anls_empty_strings():
    assert anls("", ["abc"]) == 0.0
    assert anls("", [""]) == 1.0  # rrc-script: length 0 -> distance ratio 0


def test_anls_divides_by_the_raw_lengths_as_the_official_script():
    # rrc-script: length = max(len(answer.upper()), len(prediction.upper())) on the raw strings
    assert anls(" abx", ["abc"]) == pytest.approx(1 - 1 / 4)
    assert anls("abx", ["abc"]) == pytest.approx(1 - 1 / 3)


def test_anls_refuses_a_threshold_outside_unit_interval():
    with pytest.raises(ValueError, match="threshold"):
        anls("a", ["a"], threshold=1.5)


# ---------------------------------------------------------------------------------------------------------------
# exact_match
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "target", "expected"),
    [
        ("Paris.", "paris", 1.0),
        ("  New   York ", "new york", 1.0),
        ("new york .", "New York", 1.0),
        ("1.5", "15", 0.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
        ("", "paris", 0.0),
        ("paris..", "paris", 0.0),  # one trailing period only
    ],
)
def test_exact_match_normalization(prediction, target, expected):
    assert exact_match(prediction, [target]) == expected


def test_exact_match_is_max_over_targets():
    assert exact_match("NYC", ["New York", "nyc"]) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# extract_choice, multiple_choice_accuracy
# ---------------------------------------------------------------------------------------------------------------

OPTIONS = ["Paris", "London", "Berlin", "Madrid"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("Answer: B", "B"),
        ("The answer is B", "B"),
        ("The correct answer is (B).", "B"),  # lmms-mcq module docstring example
        # vlmeval-match: the example in the comment above its "answer is" regex
        ("The correct answer is **B**. Here's why: London is the capital.", "B"),
        # lmms-mcq AI2D filter: a response opening with "B."
        ("B. Because the city on the Thames is the capital of the United Kingdom.", "B"),
        ("(B) because the city on the Thames is the capital of the United Kingdom.", "B"),
        ("The answer is (C), I think, after looking closely at the chart", "C"),  # "answer is", parenthesised
        ("London", "B"),  # vlmeval-match can_infer_text: the option's full text
        # vlmeval-match order: the option text (London = B) is read before lmms-eval's opening-letter rule (A)
        ("A. I would say London", "B"),
        ("london.", "B"),
        ("It is London", "B"),
        ("A or B", None),  # vlmeval-match: two letters -> undecided
        ("Paris or London", None),  # two option texts -> undecided
        ("E", None),  # not an offered letter
        ("I cannot tell from the image.", None),  # a refusal
        ("", None),
        ("the answer is a bit unclear", None),  # lowercase "a" is an article, never option A
        ("b", None),  # letters are case-sensitive, as in both references
    ],
)
def test_extract_choice_forms(prediction, expected):
    assert extract_choice(prediction, OPTIONS) == expected


def test_extract_choice_ignores_a_letter_early_in_a_long_discussion():
    # vlmeval-match can_infer_option: a lone letter counts only among the last four tokens.
    text = "Looking at option C in the chart it seems plausible but the bars disagree with it overall"
    assert extract_choice(text, OPTIONS) is None


def test_extract_choice_option_text_ignored_in_long_answers():
    # vlmeval-match can_infer_text: an answer longer than twice all option texts is not matched by text.
    long_answer = "The capital city that I believe matches the picture best is clearly London, " * 2
    assert extract_choice(long_answer, OPTIONS) is None


def test_extract_choice_option_text_that_is_a_substring_of_another_is_ambiguous():
    assert extract_choice("cats", ["cat", "cats"]) is None


def test_extract_choice_accepts_a_letter_dict():
    assert extract_choice("The answer is C", {"A": "yes", "B": "no", "C": "maybe"}) == "C"
    assert extract_choice("D", {"A": "yes", "B": "no"}) is None


@pytest.mark.parametrize(
    ("options", "match"),
    [([], "empty"), ({"a": "x"}, "uppercase letter"), (["x", " "], "non-empty text"), ("AB", "list")],
)
def test_extract_choice_refuses_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        extract_choice("A", options)


def test_multiple_choice_accuracy_with_index_or_letter_answers():
    # AI2D and ScienceQA store the right option as a 0-based index.
    assert multiple_choice_accuracy("B.", OPTIONS, 1) == 1.0
    assert multiple_choice_accuracy("B.", OPTIONS, "B") == 1.0
    assert multiple_choice_accuracy("C", OPTIONS, 1) == 0.0
    assert multiple_choice_accuracy("I am not sure", OPTIONS, 1) == 0.0


@pytest.mark.parametrize("answer", [4, -1, "1", "E", True])
def test_multiple_choice_accuracy_refuses_an_answer_outside_the_options(answer):
    with pytest.raises(ValueError, match="answer"):
        multiple_choice_accuracy("B", OPTIONS, answer)


# ---------------------------------------------------------------------------------------------------------------
# pope
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("no", "no"),
        ("No, there is no dog.", "no"),
        ("There is not a dog in the image.", "no"),  # pope-eval: "not" counts as no
        ("No.", "no"),
        ("No\n", "no"),  # split on any whitespace (our one deviation)
        ("There is a dog. It is not red.", "yes"),  # pope-eval: only the first sentence counts
        ("NO", "yes"),  # pope-eval: only "No", "no", "not" are negatives
        ("No!", "yes"),  # the word is "No!", not "No"
        ("Nope", "yes"),
        ("", "yes"),
    ],
)
def test_pope_answer_follows_the_reference_rule(text, expected):
    assert pope_answer(text) == expected


def test_pope_all_yes_predictions():
    labels = ["yes"] * 5 + ["no"] * 5
    scores = pope(["Yes"] * 10, labels)
    assert scores == pytest.approx(
        {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
    )


def test_pope_all_no_predictions_use_zero_for_undefined_ratios():
    # pope-eval divides by TP + FP = 0 here; we return 0.0 (LLaVA / lmms-eval convention).
    scores = pope(["No"] * 4, ["yes", "yes", "no", "no"])
    assert scores == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_pope_mixed_counts():
    predictions = ["Yes", "Yes, it is.", "No", "There is not.", "yes", "No"]
    labels = ["yes", "no", "yes", "no", "YES", "no"]  # labels are case-insensitive
    # TP = 2 (rows 0, 4), FP = 1 (row 1), FN = 1 (row 2), TN = 2 (rows 3, 5)
    scores = pope(predictions, labels)
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)
    assert scores["yes_ratio"] == pytest.approx(3 / 6)  # of the predictions, not the labels
    assert all(math.isfinite(value) for value in scores.values())


@pytest.mark.parametrize(
    ("predictions", "labels", "match"),
    [(["Yes"], ["maybe"], "labels\\[0\\]"), (["Yes"], ["yes", "no"], "equally long"), ([], [], "empty")],
)
def test_pope_refuses_bad_inputs(predictions, labels, match):
    with pytest.raises(ValueError, match=match):
        pope(predictions, labels)
