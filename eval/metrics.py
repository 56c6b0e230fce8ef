"""Task metrics, each following one named public reference implementation.

Per-sample scores (a float in [0, 1] for one prediction against its references; the caller averages them):

| function | benchmarks | reference followed |
|---|---|---|
| `relaxed_accuracy` | ChartQA | VLMEvalKit `vqa_eval.relaxed_correctness` (= pix2struct `metrics.relaxed_correctness`) |
| `vqa_accuracy` | VQAv2, TextVQA | the official VQA evaluation (GT-Vision-Lab/VQA `vqaEval.py`) |
| `anls` | DocVQA, InfographicVQA | the official RRC / DocVQA evaluation script (`infographicsvqa_eval.py`) |
| `exact_match` | short-answer tasks | VLMEvalKit `process_line(method='accuracy')`, normalisation widened |
| `multiple_choice_accuracy` | AI2D, ScienceQA | `extract_choice`: VLMEvalKit `can_infer` plus one lmms-eval rule |

Dataset-level score: `pope` (AoiDragon/POPE `evaluate.py`). All scores are fractions in [0, 1], never percentages.

Pure Python (no torch, no numpy): importable anywhere, including the CPU-only test run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from string import ascii_uppercase

# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by every metric
# ---------------------------------------------------------------------------------------------------------------


def _check_prediction(metric: str, prediction: object) -> None:
    if not isinstance(prediction, str):
        raise ValueError(
            f"{metric}: prediction must be a str, got {type(prediction).__name__} {prediction!r}; "
            "it cannot be scored. Pass the decoded model output ('' for an empty generation)."
        )


def _check_references(metric: str, name: str, references: object) -> None:
    """References are a non-empty list of strings; a bare str would silently be scored per character."""
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise ValueError(
            f"{metric}: {name} must be a list of str, got {type(references).__name__} {references!r}; "
            f"a bare string would be scored character by character. Wrap a single reference: [{references!r}]."
        )
    if not references:
        raise ValueError(
            f"{metric}: {name} is empty; there is nothing to score against. Pass the row's answer(s)."
        )
    for i, reference in enumerate(references):
        if not isinstance(reference, str):
            raise ValueError(
                f"{metric}: {name}[{i}] must be a str, got {type(reference).__name__} {reference!r}; "
                "convert the dataset's answers to strings before scoring."
            )


# ---------------------------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------------------------------------------


def _relaxed_float(text: str) -> float | None:
    """Python's float() of the text, a trailing '%' meaning /100 ("5%" -> 0.05); None when it is not a number.

    As in the reference, float() is the parser: "1,000" and "$5" are not numbers, "1e3" and " 7 " are.
    """
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def _relaxed_correct(prediction: str, target: str, max_relative_change: float) -> bool:
    prediction_number = _relaxed_float(prediction)
    target_number = _relaxed_float(target)
    # `target_number` is tested for truth, not for None, exactly as the reference does: a target of 0 (where a
    # relative change is undefined) falls through to the string comparison.
    if prediction_number is not None and target_number:
        return abs(prediction_number - target_number) / abs(target_number) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, targets: Sequence[str], max_relative_change: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1.0 if the prediction is right for any target, else 0.0.

    Follows VLMEvalKit (`vlmeval/dataset/utils/vqa_eval.py`: `relaxed_correctness`, called by
    `process_line(method='relaxed_accuracy')` and reduced with max over the answers by `hit_calculate`), whose
    per-target rule is pix2struct's `relaxed_correctness` (`pix2struct/metrics.py`), the rule of the ChartQA paper
    (Masry et al. 2022, end of section 5.1, after Methani et al. 2020). Per target:

    - when the prediction parses as a number and the target parses as a non-zero number (Python float(); a
      trailing '%' divides by 100, so "5%" equals "0.05"): correct iff |pred - target| / |target| <= 5%, the
      bound inclusive;
    - otherwise: case-insensitive exact string match.

    Consequences kept from the reference, on purpose, so that scores compare with published ones: "1,000" is not
    a number (it must equal the target string); a zero target compares as a string ("0.0" against "0" is wrong);
    negative numbers compare by relative change against |target|.

    Where the references disagree: pix2struct (`aggregate_metrics`, max over targets) and lmms-eval
    (`lmms_eval/tasks/chartqa/utils.py`, one target) score the raw prediction; VLMEvalKit strips it first. We
    follow VLMEvalKit: generated text often ends in a newline, and "12%\\n" or "Yes\\n" must not be wrong for it.
    Targets are not stripped (as in all three); the score is the max over them (pix2struct, VLMEvalKit).
    """
    _check_prediction("relaxed_accuracy", prediction)
    _check_references("relaxed_accuracy", "targets", targets)
    prediction = prediction.strip()
    return float(any(_relaxed_correct(prediction, target, max_relative_change) for target in targets))


# ---------------------------------------------------------------------------------------------------------------
# VQAv2 / TextVQA accuracy
# ---------------------------------------------------------------------------------------------------------------

# The official tables (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py). Contraction keys
# spelled with capitals there (Im, Ive, Id've, I'dve) never match, because words are lowercased first, and two
# entries map a word to itself (let's, she's): those six are left out, which changes nothing.
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",  # sic: the official table maps this one the wrong way round; kept for fidelity
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe and colon are deliberately absent ("girl's", "2:50"); the period has its own rule below.
_VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                    ",", "?", "!")  # fmt: skip
_VQA_DIGIT_COMMA = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)". Its "(?!<=\d)" is a lookahead for the two characters "<=" and a
# digit, not a lookbehind, so it never blocks a match: the rule in force drops every period not followed by a
# digit ("2." -> "2", "1.5" kept). VLMEvalKit's `process_punctuation` turned it into a real lookbehind (keeping
# "2."); we keep the official behaviour, which EvalAI scores VQAv2 and TextVQA with. (The official call also passes
# re.UNICODE where re.sub takes `count`, capping removals at 32 periods; no answer has that many.)
_VQA_PERIOD = re.compile(r"\.(?!\d)")


def _vqa_process_punctuation(text: str) -> str:
    """Official `processPunctuation`: each mark is deleted when it touches a space (or when the text holds a
    digit-comma-digit, "100,978" -> "100978"), else replaced by a space ("red,blue" -> "red blue")."""
    delete_all = _VQA_DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _VQA_PERIOD.sub("", out)


def _vqa_process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, number words to digits, drop articles, restore apostrophes."""
    words = [_VQA_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation (what `vqa_accuracy` compares): newlines and tabs to spaces, strip,
    punctuation rule, period rule, lowercase, number words "none"/"zero".."ten" to digits, articles a/an/the
    dropped, missing apostrophes restored ("dont" -> "don't"). Matches https://visualqa.org/evaluation.html."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_process_digit_article(_vqa_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2/TextVQA accuracy of one prediction against the human answers (10 per question in both datasets).

    Follows the official evaluation (GT-Vision-Lab/VQA `vqaEval.py`, https://visualqa.org/evaluation.html): with
    the answers and the prediction normalised by `normalize_vqa_answer`, each answer i in turn is left out and the
    prediction scores min(1, (how many of the other answers equal it) / 3); the score is the mean of those. With 10
    answers, a prediction given by 0, 1, 2, 3, 4+ humans scores 0, 0.3, 0.6, 0.9, 1.

    Where the references disagree: the official script normalises the ground-truth answers only with the
    punctuation rule, and only when the annotators disagree, because VQAv2's released answers are already
    normalised; lmms-eval (`tasks/vqav2/utils.py`, `tasks/textvqa/utils.py`) and VLMEvalKit (`process_answer`)
    normalise them fully, as the prediction. We normalise them fully: it is what visualqa.org describes ("done for
    ground truth answers as well"), it changes nothing on already-normalised VQAv2 answers, and TextVQA's answers
    are raw ("Nokia", "two"). We do not add the extra tokenisation of EvalAI's TextVQA processor ("'s" -> " 's").

    Fewer than 10 answers (our choice; the references assume 10): with n >= 2 answers the same leave-one-out mean
    is taken, full credit needing min(3, n - 1) matching others, so an answer every human gave still scores 1
    (3 answers [x, x, y], prediction x: (1/2 + 1/2 + 2/2) / 3 = 2/3). With 1 answer there is nobody to leave out:
    the score is normalised exact match. With 10 answers this is exactly the official formula.
    """
    _check_prediction("vqa_accuracy", prediction)
    _check_references("vqa_accuracy", "answers", answers)
    normalized_prediction = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == normalized_prediction for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    full_credit = min(3, len(matches) - 1)
    total_matches = sum(matches)
    # Leaving answer i out removes its own match (if any) from the count.
    scores = [min(1.0, (total_matches - match) / full_credit) for match in matches]
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------------------------------
# DocVQA / InfographicVQA ANLS
# ---------------------------------------------------------------------------------------------------------------


def _levenshtein(a: str, b: str) -> int:
    """Character edit distance (insert, delete, substitute: cost 1 each), two rows of O(len(b)) memory."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    """The official script's preprocessing: strip, lowercase, runs of whitespace collapsed to one space."""
    return " ".join(text.strip().lower().split())


def _anls_similarity(prediction: str, answer: str) -> float:
    distance = _levenshtein(_anls_normalize(answer), _anls_normalize(prediction))
    # The official script divides by the longer of the two *raw* strings (its `len(x.upper())`), not of the
    # normalised ones; lmms-eval, VLMEvalKit and Qwen-VL copy it. Kept for comparable numbers (see `anls`).
    length = max(len(answer.upper()), len(prediction.upper()))
    return 1.0 - (distance / length if length else 0.0)


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA/InfographicVQA ANLS of one prediction: the best normalised Levenshtein similarity over the answers,
    0.0 when that best is below `threshold`.

    Follows the official RRC evaluation script (https://rrc.cvc.uab.es/?ch=17, "infographicsvqa_eval.py",
    copied by lmms-eval `api/metrics.anls` and VLMEvalKit `vqa_eval.anls_compute`): both strings are stripped,
    lowercased and their whitespace collapsed; similarity = 1 - distance / max(len(answer), len(prediction)), two
    empty strings scoring 1; a score equal to the threshold is kept (the script zeroes only `score < threshold`,
    and pix2struct keeps `distance ratio <= threshold` alike, where the ST-VQA paper's Eq. 1 writes a strict
    bound).

    One quirk is kept on purpose: the lengths in the denominator are those of the raw strings, so surrounding
    whitespace in a prediction raises its score a little (" abx" against "abc" scores 0.75, "abx" scores 2/3).
    pix2struct (`metrics.anls_metric`) divides by the normalised lengths instead; we follow the official script,
    which DocVQA/InfographicVQA leaderboards and the other two toolkits use. Strip generations before scoring.
    """
    _check_prediction("anls", prediction)
    _check_references("anls", "answers", answers)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"anls: threshold must be in [0, 1], got {threshold!r}; the benchmarks use 0.5.")
    best = max(_anls_similarity(prediction, answer) for answer in answers)
    return best if best >= threshold else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Normalised exact match
# ---------------------------------------------------------------------------------------------------------------


def _normalize_for_exact_match(text: str) -> str:
    text = " ".join(text.split()).lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, targets: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised target, else 0.0.

    Normalisation (prediction and targets alike): runs of whitespace collapsed to one space and stripped,
    lowercased, then one trailing period removed ("Paris." == "paris", "New  York" == "new york"; "1.5" != "15",
    "Paris, France" != "Paris"). It widens VLMEvalKit's `process_line(method='accuracy')` (strip + lowercase)
    with the whitespace and final-period steps, because chat models end short answers with a sentence's period.
    """
    _check_prediction("exact_match", prediction)
    _check_references("exact_match", "targets", targets)
    normalized_prediction = _normalize_for_exact_match(prediction)
    return float(any(_normalize_for_exact_match(target) == normalized_prediction for target in targets))


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice: answer extraction, AI2D/ScienceQA accuracy
# ---------------------------------------------------------------------------------------------------------------

_CHOICE_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}\s]+")  # VLMEvalKit `can_infer_option`'s chars, and spaces
# "...answer is B", "The correct answer is **(C)**." -- the phrase in any case, the letter uppercase and whole.
_ANSWER_IS_LETTER = re.compile(r"(?i:answer\s+is)\s*:?\s*\**\(?([A-Z])\b")
# lmms-eval's AI2D filter takes a response opening with "B."; "(B)", "B)" and "B:" are read the same way.
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])[.):](?!\w)")


def _option_map(function: str, options: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Letter -> option text; a list is lettered A, B, C, ... in order."""
    if isinstance(options, Mapping):
        letter_to_text = dict(options)
    elif isinstance(options, Sequence) and not isinstance(options, str):
        if len(options) > len(ascii_uppercase):
            raise ValueError(f"{function}: {len(options)} options, but letters run out at 26 (A-Z).")
        letter_to_text = dict(zip(ascii_uppercase, options, strict=False))
    else:
        raise ValueError(
            f"{function}: options must be a list of option texts or a dict letter -> text, got "
            f"{type(options).__name__} {options!r}."
        )
    if not letter_to_text:
        raise ValueError(
            f"{function}: options is empty; a multiple-choice question needs at least one option."
        )
    for letter, text in letter_to_text.items():
        if not (isinstance(letter, str) and len(letter) == 1 and letter in ascii_uppercase):
            raise ValueError(
                f"{function}: option key {letter!r} is not one uppercase letter A-Z; use 'A', 'B', ..."
            )
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{function}: option {letter} is {text!r}; an option needs a non-empty text (an empty one "
                "would match every prediction)."
            )
    return letter_to_text


def _letter_from_tokens(prediction: str, letters: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer_option`: exactly one option letter stands alone as a token, among the last four."""
    tokens = [token for token in _CHOICE_SEPARATORS.split(prediction) if token]
    present = [letter for letter in letters if letter in tokens]
    if len(present) == 1 and tokens.index(present[0]) >= len(tokens) - 4:
        return present[0]
    return None


def _letter_from_pattern(pattern: re.Pattern[str], prediction: str, letters: Mapping[str, str]) -> str | None:
    found = pattern.search(prediction)
    return found.group(1) if found and found.group(1) in letters else None


def _letter_from_option_text(prediction: str, letters: Mapping[str, str]) -> str | None:
    """VLMEvalKit `can_infer_text`: exactly one option's text occurs in a prediction at most twice as long as all
    option texts together (a longer one is discussing the options, not picking one)."""
    lowered = prediction.lower()
    if len(lowered) > 2 * sum(len(text) for text in letters.values()):
        return None
    found = [letter for letter, text in letters.items() if text.lower() in lowered]
    return found[0] if len(found) == 1 else None


def extract_choice(prediction: str, options: Sequence[str] | Mapping[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None when it picks none or several.

    `options` is a list of option texts (lettered A, B, C, ... in order) or a dict letter -> text. Rules, first
    hit wins:

    1. VLMEvalKit `can_infer_option` (`vlmeval/utils/matching_util.py`): after replacing ``.()[],:;!*#{}`` by
       spaces, exactly one option letter appears as a whole uppercase token, and among the last four tokens:
       "B", "(B)", "B.", "Answer: B", "The answer is B".
    2. VLMEvalKit's "answer is X" pattern: "The correct answer is **B**. Here's why: ...".
    3. VLMEvalKit `can_infer_text`: exactly one option's text occurs in the answer, case-insensitively, and the
       answer is at most twice as long as all option texts together: "London", "It is london.".
    4. lmms-eval's AI2D rule (`tasks/ai2d/utils.py` `MultiChoiceRegexFilter`): the answer opens with a letter
       and "." (also "(B)", "B)", "B:"): "B. Because the city on the Thames ...".

    We follow VLMEvalKit's `can_infer` (rules 1-3, in its order), the heuristic stage of MMBench's own
    evaluation, which returns nothing rather than guess when an answer names several letters or options: where
    it finds a letter we return the same one. Where it finds none it asks an LLM judge; we have none, so rule 4
    from lmms-eval recovers the common "B. <explanation>" form instead of scoring it wrong. Adaptations of rule 2:
    the letters are the given options (VLMEvalKit hard-codes A-D), may be parenthesised ("answer is (B)") and must
    be uppercase whole words (its case-insensitive pattern reads "the answer is a bit unclear" as A). VLMEvalKit's 'Z' (refusal) answer is not
    produced: a refusal gives None, which scores as wrong. Letters are case-sensitive throughout, as in both
    references, so the article "a" never counts as option A.
    """
    _check_prediction("extract_choice", prediction)
    letters = _option_map("extract_choice", options)
    return (
        _letter_from_tokens(prediction, letters)
        or _letter_from_pattern(_ANSWER_IS_LETTER, prediction, letters)
        or _letter_from_option_text(prediction, letters)
        or _letter_from_pattern(_LEADING_LETTER, prediction, letters)
    )


def _answer_letter(answer: str | int, letters: Mapping[str, str]) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(letters):
            raise ValueError(
                f"multiple_choice_accuracy: answer index {answer} is outside the {len(letters)} options; "
                "pass the 0-based index of the right option (AI2D and ScienceQA store it so)."
            )
        return list(letters)[answer]
    if isinstance(answer, str) and answer.strip() in letters:
        return answer.strip()
    raise ValueError(
        f"multiple_choice_accuracy: answer {answer!r} is neither a 0-based option index nor one of the option "
        f"letters {sorted(letters)}; AI2D stores the index as a string, so pass int(answer)."
    )


def multiple_choice_accuracy(
    prediction: str, options: Sequence[str] | Mapping[str, str], answer: str | int
) -> float:
    """AI2D/ScienceQA accuracy of one prediction: 1.0 if `extract_choice` reads the right option, else 0.0.

    `answer` is the right option's letter ("B") or its 0-based index into `options` (2). An answer from which no
    single option can be read scores 0. One extraction rule for every multiple-choice task (see `extract_choice`),
    rather than lmms-eval's per-task ones (its ScienceQA accepts only "B" or a "B." opening), keeps base, SFT and
    DPO scores comparable across tasks.
    """
    letters = _option_map("multiple_choice_accuracy", options)
    return float(extract_choice(prediction, letters) == _answer_letter(answer, letters))


# ---------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """The yes/no a free-text POPE answer gives, by the reference rule (AoiDragon/POPE `evaluate.py`).

    Only the text before the first '.' counts; commas are removed; if a word is exactly "No", "no" or "not" the
    answer is "no", otherwise "yes" (so "", "Nope", "NO" and "No!" all read as "yes", as in the reference). One
    deviation: words are split on any whitespace, not on ' ' alone, so "No\\n" reads as "no".
    """
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split()
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def _pope_label(label: object, row: int) -> bool:
    """True for a "yes" (positive) label."""
    if isinstance(label, str) and label.strip().lower() in ("yes", "no"):
        return label.strip().lower() == "yes"
    raise ValueError(
        f"pope: labels[{row}] is {label!r}; POPE labels are 'yes' or 'no'. (The reference reads anything but "
        "'no' as yes; we refuse it instead of guessing.)"
    )


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def pope(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE scores with "yes" as the positive class: accuracy, precision, recall, f1 and yes_ratio.

    Follows AoiDragon/POPE `evaluate.py`: each prediction is read with `pope_answer`; yes_ratio is the fraction of
    *predictions* that read "yes" (lmms-eval's `pope_aggregate_yes_ratio` counts the labels instead; we follow the
    reference, whose yes_ratio measures the model's bias toward "yes"). Where the reference divides by zero
    (no "yes" predicted: precision; no "yes" label: recall; precision + recall = 0: f1) we return 0.0, as
    LLaVA's and lmms-eval's POPE code do. All-"yes" predictions on balanced labels give accuracy 0.5,
    precision 0.5, recall 1, f1 2/3, yes_ratio 1.
    """
    for name, values in (("predictions", predictions), ("labels", labels)):
        _check_references("pope", name, values)
    if len(predictions) != len(labels):
        raise ValueError(
            f"pope: {len(predictions)} predictions but {len(labels)} labels; they pair up row by row, so the "
            "lists must be equally long."
        )
    said_yes = [pope_answer(prediction) == "yes" for prediction in predictions]
    is_yes = [_pope_label(label, row) for row, label in enumerate(labels)]
    true_pos = sum(p and t for p, t in zip(said_yes, is_yes, strict=True))
    false_pos = sum(p and not t for p, t in zip(said_yes, is_yes, strict=True))
    false_neg = sum(t and not p for p, t in zip(said_yes, is_yes, strict=True))
    true_neg = len(labels) - true_pos - false_pos - false_neg
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + false_neg)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (true_pos + true_neg) / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(said_yes) / len(said_yes),
    }
