"""eval.tasks on local fixtures shaped like the hub datasets: exact prompts, references, metrics, overrides."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import datasets
import pytest
from PIL import Image

from data.sample import DataError, ImageRef, Origin
from data.synthetic import write_synthetic
from eval.tasks import TASKS, EvalExample, get_task, load_examples, resolve_tasks, score_task
from tests.conftest import drawn_image


@pytest.fixture(autouse=True)
def _offline_datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets cache inside tmp_path, and never reach the hub."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def png(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    drawn_image(*size, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(path, rows: list[dict], image_columns=("image",)):
    """Rows with image bytes in an Image column, as the hub's parquet files store them."""
    features = datasets.Dataset.from_list(rows).features
    for column in image_columns:
        features[column] = datasets.Image()
    datasets.Dataset.from_list(rows, features=features).to_parquet(path)
    return path


def image_cell(seed: int):
    return {"bytes": png(seed), "path": None}


def user_text(example: EvalExample) -> str:
    return example.messages[-1]["content"][-1]["text"]


def test_chartqa_prompt_references_and_relaxed_accuracy(tmp_path, tiny_processor):
    rows = [
        {"image": image_cell(0), "query": "How many bars are there?", "label": ["4"], "human_or_machine": 0},
        {
            "image": image_cell(1),
            "query": "What is the peak value?",
            "label": ["12.5"],
            "human_or_machine": 1,
        },
    ]
    task = TASKS["chartqa"].with_source(path=write_parquet(tmp_path / "chartqa.parquet", rows))
    examples = load_examples(task)
    assert [e.id for e in examples] == ["0", "1"]
    assert examples[0].messages == (
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "text", "text": "How many bars are there?\nAnswer the question with a single word."},
            ],
        },
    )
    assert tiny_processor.apply_chat_template(list(examples[0].messages), add_generation_prompt=True) == (
        "<|user|>\n<|image_1|>\nHow many bars are there?\nAnswer the question with a single word.<|end|>\n<|assistant|>\n"
    )
    assert [e.references for e in examples] == [("4",), ("12.5",)]
    assert examples[1].meta == {"human_or_machine": 1}
    assert isinstance(examples[0].images[0], ImageRef) and examples[0].images[0].data == png(0)
    metrics, scores = score_task(task, examples, ["4", "13"])  # 13 is 4% off 12.5: within the 5% tolerance
    assert scores == [1.0, 1.0] and metrics == {"relaxed_accuracy": 1.0}
    assert score_task(task, examples, ["5", "13.2"])[0] == {"relaxed_accuracy": 0.0}


def test_docvqa_and_textvqa_prompts_and_metrics(tmp_path):
    doc_rows = [
        {
            "questionId": "337",
            "question": "What is the date?",
            "image": image_cell(0),
            "answers": ["March 3, 1965", "3/3/65"],
            "docId": 279,
            "data_split": "val",
        }
    ]
    docvqa = TASKS["docvqa"].with_source(path=write_parquet(tmp_path / "docvqa.parquet", doc_rows))
    [doc] = load_examples(docvqa)
    assert user_text(doc) == "What is the date?\nAnswer the question using a single word or phrase."
    assert doc.references == ("March 3, 1965", "3/3/65") and doc.meta == {"questionId": "337", "docId": 279}
    assert score_task(docvqa, [doc], ["march 3, 1965"])[0] == {"anls": 1.0}

    text_rows = [
        {
            "question_id": 34602,
            "question": "what is the brand of this camera?",
            "image": image_cell(1),
            "answers": ["nous les gosses", "dakota"] + ["dakota digital"] * 8,
            "ocr_tokens": ["dakota"],
        }
    ]
    textvqa = TASKS["textvqa"].with_source(path=write_parquet(tmp_path / "textvqa.parquet", text_rows))
    [text] = load_examples(textvqa)
    # lmms-eval capitalizes the question.
    assert (
        user_text(text)
        == "What is the brand of this camera?\nAnswer the question using a single word or phrase."
    )
    assert len(text.references) == 10
    assert score_task(textvqa, [text], ["Dakota Digital"])[0] == {"vqa_accuracy": 1.0}
    assert score_task(textvqa, [text], ["dakota"])[0]["vqa_accuracy"] == pytest.approx(0.3)


def test_ai2d_options_block_and_letter_answers(tmp_path):
    rows = [
        {
            "question": "Which stage comes first?",
            "options": ["egg", "larva", "pupa", "adult"],
            "answer": "0",
            "image": image_cell(0),
        },
        {
            "question": "What eats the grass?",
            "options": ["deer", "hawk"],
            "answer": "1",
            "image": image_cell(1),
        },
    ]
    task = TASKS["ai2d"].with_source(path=write_parquet(tmp_path / "ai2d.parquet", rows))
    examples = load_examples(task)
    assert user_text(examples[0]) == (
        "Which stage comes first?\nA. egg\nB. larva\nC. pupa\nD. adult\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [e.references for e in examples] == [("A",), ("B",)]
    assert examples[1].meta["options"] == ["deer", "hawk"] and examples[1].meta["answer"] == 1
    metrics, scores = score_task(task, examples, ["A", "The answer is A."])
    assert scores == [1.0, 0.0] and metrics == {"accuracy": 0.5}


def test_scienceqa_context_line_and_text_only_questions(tmp_path):
    rows = [
        {
            "image": image_cell(0),
            "question": "Which animal's feet are adapted for swimming?",
            "choices": ["duck", "cat"],
            "answer": 0,
            "hint": "Look at the picture.",
            "subject": "natural science",
        },
        {
            "image": None,
            "question": "Which word is a noun?",
            "choices": ["run", "happy", "table"],
            "answer": 2,
            "hint": "",
            "subject": "language science",
        },
    ]
    task = TASKS["scienceqa"].with_source(path=write_parquet(tmp_path / "sqa.parquet", rows))
    with_image, text_only = load_examples(task)
    assert user_text(with_image) == (
        "Context: Look at the picture.\nWhich animal's feet are adapted for swimming?\n"
        "A. duck\nB. cat\nAnswer with the option's letter from the given choices directly."
    )
    assert user_text(text_only) == (
        "Which word is a noun?\nA. run\nB. happy\nC. table\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert len(with_image.images) == 1 and text_only.images == ()
    assert text_only.messages[0]["content"] == [{"type": "text", "text": user_text(text_only)}]
    assert [with_image.references, text_only.references] == [("A",), ("C",)]
    assert score_task(task, [with_image, text_only], ["A", "table"])[0] == {"accuracy": 1.0}


def test_pope_labels_and_dataset_level_metrics(tmp_path):
    rows = [
        {
            "id": str(i),
            "question_id": str(i + 1),
            "question": f" Is there a {thing} in the image? ",
            "answer": answer,
            "image_source": "COCO_val2014_000000310196",
            "image": image_cell(i),
            "category": "adversarial",
        }
        for i, (thing, answer) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "Yes"), ("bus", "no")])
    ]
    task = TASKS["pope"].with_source(path=write_parquet(tmp_path / "pope.parquet", rows))
    examples = load_examples(task)
    assert (
        user_text(examples[0])
        == "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    assert [e.references[0] for e in examples] == ["yes", "no", "yes", "no"]
    assert examples[0].meta == {"question_id": "1", "category": "adversarial"}
    metrics, scores = score_task(task, examples, ["Yes", "Yes.", "yes", "No"])
    assert scores == [1.0, 0.0, 1.0, 1.0]
    assert metrics == {
        "accuracy": 0.75,
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "yes_ratio": 0.75,
    }
    assert task.metrics == tuple(metrics) and task.ungated_metrics == {"yes_ratio"}


def test_pope_label_other_than_yes_or_no_names_the_row(tmp_path):
    rows = [{"question": "Is there a dog?", "answer": "maybe", "image": image_cell(0)}]
    task = TASKS["pope"].with_source(path=write_parquet(tmp_path / "pope.parquet", rows))
    with pytest.raises(DataError, match=r"pope .*row 0, field 'answer': bad label"):
        load_examples(task)


def test_jsonl_with_image_paths_columns_renames_and_limit(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        drawn_image(32, 32, seed=i).save(tmp_path / "imgs" / f"{i}.png")
        rows.append({"img": f"imgs/{i}.png", "q": f"What is shown {i}?", "label": [str(i)]})
    path = tmp_path / "charts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = TASKS["chartqa"].with_source(path=path, columns={"img": "image", "q": "query"})
    assert (task.split, task.config, task.revision) == (
        "train",
        None,
        None,
    )  # a local file is the split 'train'
    examples = load_examples(task, limit=3)
    assert [e.id for e in examples] == ["0", "1", "2"]
    assert examples[2].images[0].path == (tmp_path / "imgs" / "2.png").resolve()
    assert user_text(examples[2]) == "What is shown 2?\nAnswer the question with a single word."


def test_missing_column_names_row_field_and_fix(tmp_path):
    rows = [{"image": image_cell(0), "question": "What?", "label": ["x"]}]  # ChartQA calls it `query`
    task = TASKS["chartqa"].with_source(path=write_parquet(tmp_path / "c.parquet", rows))
    with pytest.raises(DataError, match=r"row 0, field 'query': missing column.*task's `columns`"):
        load_examples(task)


def test_synthetic_task_reads_the_held_out_split(tmp_path):
    paths = write_synthetic(
        tmp_path / "synthetic", seed=0, n_train=2, n_eval=10, n_pref_train=0, n_pref_eval=0
    )
    raw_rows = [json.loads(line) for line in paths.sft_eval.read_text().splitlines()]
    [task] = resolve_tasks(
        ["synthetic"], data=SimpleNamespace(train=[SimpleNamespace(format="synthetic", path=str(paths.root))])
    )
    examples = load_examples(task)
    assert len(examples) == 10
    for example, row in zip(examples, raw_rows):
        # The prompt is the conversation less its last answer; the reference is that answer.
        assert list(example.messages) == row["messages"][:-1]
        assert example.references == (row["messages"][-1]["content"][0]["text"],)
        assert [ref.path for ref in example.images] == [
            (paths.root / image).resolve() for image in row["images"]
        ]
    assert examples[9].messages[0]["role"] == "system" and len(examples[9].messages) == 4  # the dialogue row
    assert examples[4].images == () and examples[4].meta == {"kind": "text"}
    assert examples[0].meta == {"kind": "colour"}
    metrics, _ = score_task(task, examples, [e.references[0] + "." for e in examples])
    assert metrics == {"exact_match": 1.0}


def test_synthetic_task_without_its_dataset_says_how_to_get_it(tmp_path):
    task = TASKS["synthetic"].with_source(path=tmp_path / "absent")
    with pytest.raises(ValueError, match="not a directory holding sft_eval.jsonl.*sft stage writes"):
        load_examples(task)


def test_resolve_tasks_and_errors(tmp_path):
    tasks = resolve_tasks(["chartqa", "pope", "chartqa"], paths={"pope": str(tmp_path / "p.parquet")})
    assert [t.name for t in tasks] == ["chartqa", "pope"]
    assert tasks[0] is TASKS["chartqa"] and tasks[1].path == str(tmp_path / "p.parquet")
    assert resolve_tasks(["synthetic"])[0].path == "runs/.data/synthetic"  # the demo's default location
    with pytest.raises(ValueError, match="eval task 'chartqaa' is not known.*'chartqa'"):
        get_task("chartqaa")
    with pytest.raises(ValueError, match=r"paths are given for \['docvqa'\]"):
        resolve_tasks(["chartqa"], paths={"docvqa": "d.parquet"})
    with pytest.raises(ValueError, match="limit must be a positive int"):
        load_examples(TASKS["chartqa"], limit=0)


def test_hub_sources_are_the_documented_datasets():
    """Hub ids, configs and splits as lmms-eval reads them (the tests never load them: no network)."""
    sources = {
        name: (task.path, task.config, task.split) for name, task in TASKS.items() if name != "synthetic"
    }
    assert sources == {
        "chartqa": ("HuggingFaceM4/ChartQA", None, "test"),
        "docvqa": ("lmms-lab/DocVQA", "DocVQA", "validation"),
        "textvqa": ("lmms-lab/textvqa", None, "validation"),
        "ai2d": ("lmms-lab/ai2d", None, "test"),
        "scienceqa": ("lmms-lab/ScienceQA", "ScienceQA-IMG", "test"),
        "pope": ("lmms-lab/POPE", None, "test"),
    }


def test_score_task_needs_one_prediction_per_example():
    example = EvalExample(
        id="0",
        messages=({"role": "user", "content": "hi"},),
        images=(Image.new("RGB", (4, 4)),),
        references=("a",),
        origin=Origin("t", 0),
    )
    with pytest.raises(ValueError, match="2 predictions for 1 examples"):
        score_task(TASKS["synthetic"], [example], ["a", "b"])
