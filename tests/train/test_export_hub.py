"""The export that leaves this project: a small model with CLIP's real geometry (336 px crops, 14 px patches), a
random LoRA + full-trained projector saved as training saves it, exported by `python -m train.export`; the merged
folder and the adapter reload (ours, the Auto classes, PEFT) to the trained logits, and their files follow the hub
checkpoint's rules (docs/export.md). Also: stop ids of loaded folders, portable adapter configs, the upload's dry run
and a local stand-in for the hub API. Seconds on 2 CPU cores."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
)

import models
from config import load_recipe
from config.parse import resolved_yaml
from models.adapters import ADAPTER_CONFIG, FULL_WEIGHTS, PEFT_011_LORA_KEYS, apply_adapter, portable_config
from models.phi3v import Phi3VForCausalLM, Phi3VImageProcessor, Phi3VProcessor
from models.phi3v.export_files import (
    PHI3_VISION,
    hub_layout_problems,
    old_tokenizers_problems,
    write_hub_files,
)
from models.phi3v.tiny import build_tiny_tokenizer, tiny_config
from rundir.atomic import write_text_atomically
from rundir.layout import adapter_dir, merged_dir, recipe_file
from train.core.model_loading import save_trained
from train.core.trainable import configure_trainable
from train.export import merge as export

from ..conftest import PHI3V_HUB, PHI35V_HUB, REPO, needs_hub

TEXTS = [
    "What does the chart show?",
    "A bar chart of sales by year.",
    "How many circles are there?",
    "Three.",
]
NUM_CROPS = 2


def real_geometry_model(seed: int = 0):
    """Phi-3-V with CLIP's real crop geometry (336 px, 14 px patches: 144 tokens per crop) and tiny widths."""
    tokenizer = build_tiny_tokenizer(TEXTS)
    torch.manual_seed(seed)
    config = tiny_config(
        tokenizer,
        hidden_size=64,
        num_hidden_layers=2,
        vision_hidden_size=32,
        vision_layers=2,
        crop_size=336,
        patch_size=14,
        initializer_range=0.1,
    )
    model = Phi3VForCausalLM(config).eval()
    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=NUM_CROPS), tokenizer)
    return model, processor


def batch_of(processor):
    image = Image.new("RGB", (500, 300), (30, 90, 200))
    image.paste((250, 200, 20), (40, 40, 200, 260))
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TEXTS[0]}]}],
        add_generation_prompt=True,
    )
    return processor(text=[prompt], images=[image])


def logits_of(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run directory whose SFT adapter (random LoRA, projector trained in full) was saved as training saves it,
    exported with `python -m train.export`; the trained model's logits."""
    run = tmp_path_factory.mktemp("run")
    recipe = load_recipe(
        REPO / "recipes" / "demo.yaml",
        [f"output_dir={run}", f"model.num_crops={NUM_CROPS}", "data.max_length=4096", "stages=[sft,export]"],
    )
    write_text_atomically(recipe_file(run), resolved_yaml(recipe))
    model, processor = real_geometry_model()
    model.save_pretrained(run / "base")
    processor.save_pretrained(run / "base")
    trained = configure_trainable(model, recipe.model, recipe.lora, seed=0)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for name, param in trained.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    batch = batch_of(processor)
    expected = logits_of(trained, batch)
    save_trained(
        Accelerator(cpu=True), trained, processor, adapter_dir(run, "sft"), recipe=recipe, run_dir=run
    )
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(
        json.dumps({"synthetic": {"exact_match": {"base": 0.1, "sft": 0.8}}})
    )
    export.main([str(run), "--stage", "sft"])
    return run, batch, expected, processor


def test_merged_folder_follows_the_hub_layout(exported):
    run, _, _, processor = exported
    folder = merged_dir(run, "sft")
    assert hub_layout_problems(folder) == []
    config = json.loads((folder / "config.json").read_text())
    assert "dtype" not in config and config["torch_dtype"] == "float32"
    assert config["auto_map"] == {
        "AutoConfig": f"{PHI3_VISION}--configuration_phi3_v.Phi3VConfig",
        "AutoModelForCausalLM": f"{PHI3_VISION}--modeling_phi3_v.Phi3VForCausalLM",
    }
    assert config["rope_scaling"]["type"] == "su" and config["architectures"] == ["Phi3VForCausalLM"]
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["auto_map"] == {
        "AutoProcessor": f"{PHI3_VISION}--processing_phi3_v.Phi3VProcessor",
        "AutoImageProcessor": f"{PHI3_VISION}--image_processing_phi3_v.Phi3VImageProcessor",
    }
    assert pre["num_crops"] == NUM_CROPS and "crop_size" not in pre  # the real geometry: the hub's own keys
    ends = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>")]
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == ends
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names
    assert (
        "chat_template.jinja" not in names
    )  # transformers 4.40 reads the template from tokenizer_config.json


def test_tokenizer_files_are_what_the_old_stack_parses(exported):
    run, _, _, processor = exported
    folder = merged_dir(run, "sft")
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    assert old_tokenizers_problems(spec) == []
    assert (
        model["type"] == "BPE"
        and model["merges"]
        and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in model["merges"])
    )
    assert isinstance(model["vocab"], dict) and isinstance(model["byte_fallback"], bool)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer" and "backend" not in tok_config
    assert tok_config["chat_template"] == processor.tokenizer.chat_template
    assert tok_config["add_bos_token"] is True and tok_config["eos_token"] == "<|endoftext|>"
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert (
        special["eos_token"]["content"] == "<|endoftext|>"
        and "<|end|>" in special["additional_special_tokens"]
    )
    text = "<|user|>\nHow many circles are there?<|end|>\n<|assistant|>\nThree.<|end|>\n"
    assert (
        Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
        == processor.tokenizer(text).input_ids
    )


def test_merged_export_reloads_to_the_trained_logits_ours_and_auto(exported):
    run, batch, expected, processor = exported
    folder = merged_dir(run, "sft")
    ours = Phi3VForCausalLM.from_pretrained(folder, dtype=torch.float32)
    auto = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # no trust_remote_code: ours
    assert (
        type(auto) is Phi3VForCausalLM and type(AutoConfig.from_pretrained(folder)).__name__ == "Phi3VConfig"
    )
    assert type(AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)) is Phi3VForCausalLM
    auto_processor = AutoProcessor.from_pretrained(folder)
    assert (
        isinstance(auto_processor, Phi3VProcessor) and auto_processor.image_processor.num_crops == NUM_CROPS
    )
    again = batch_of(auto_processor)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(
        again["pixel_values"], batch["pixel_values"]
    )
    assert torch.equal(logits_of(ours, batch), logits_of(auto, batch))
    torch.testing.assert_close(logits_of(ours, batch), expected, rtol=1e-4, atol=1e-4)
    assert ours.generation_config.eos_token_id == processor.end_token_ids


def test_adapter_is_portable_and_reloads_to_the_trained_logits(exported):
    run, batch, expected, _ = exported
    folder = adapter_dir(run, "sft")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert set(config) <= PEFT_011_LORA_KEYS and "alora_invocation_tokens" not in config
    assert config["modules_to_save"] is None
    base = Phi3VForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    names = dict(base.named_modules())
    assert isinstance(config["target_modules"], list) and all(t in names for t in config["target_modules"])
    assert config["base_model_name_or_path"] == str((run / "base").resolve())  # tiny: on no hub, its folder
    record = json.loads((folder / "base_model.json").read_text())
    assert record["local_path"] == str((run / "base").resolve()) and record["full_weights"] == FULL_WEIGHTS
    full = load_file(folder / FULL_WEIGHTS)
    assert set(full) == {
        f"model.vision_embed_tokens.img_projection.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
    }
    assert not any("img_projection" in k for k in load_file(folder / "adapter_model.safetensors"))
    # The old stack's AutoProcessor(adapter, trust_remote_code=True) needs the processor's auto_map, or it returns a
    # bare tokenizer (found loading an adapter folder with transformers 4.40.2).
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert pre["auto_map"]["AutoProcessor"].endswith("--processing_phi3_v.Phi3VProcessor")
    ours = apply_adapter(base, folder, merge=False)
    torch.testing.assert_close(logits_of(ours, batch), expected, rtol=1e-5, atol=1e-5)

    from peft import AutoPeftModelForCausalLM

    auto = AutoPeftModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32
    )  # the base from the config
    assert type(auto.get_base_model()) is Phi3VForCausalLM
    auto.get_base_model().load_state_dict(full, strict=False)  # the documented plain-PEFT step (model card)
    torch.testing.assert_close(logits_of(auto, batch), expected, rtol=1e-5, atol=1e-5)
    assert old_tokenizers_problems(json.loads((folder / "tokenizer.json").read_text())) == []
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    card = (folder / "README.md").read_text()
    assert (
        "full_weights.safetensors" in card and "peft 0.11.1" in card and "| synthetic | exact_match |" in card
    )


def test_merged_card_says_base_scores_and_how_to_serve(exported):
    run, *_ = exported
    card = (merged_dir(run, "sft") / "README.md").read_text()
    assert "| synthetic | exact_match | 0.1000 | 0.8000 |" in card
    assert "trust_remote_code=True" in card and "vllm serve" in card and "--trust-remote-code" in card
    assert "num_crops 2" in card and "microsoft/Phi-3-vision-128k-instruct" in card


def test_push_to_hub_dry_run_lists_files_and_message(exported, capsys):
    run, *_ = exported
    export.main([str(run), "--stage", "sft", "--push-to-hub", "me/phi3v-demo", "--dry-run"])
    out = capsys.readouterr().out
    assert "would upload" in out and "me/phi3v-demo (private)" in out and "commit message" in out
    for name in (
        "config.json",
        "README.md",
        "tokenizer.json",
        "adapter/adapter_config.json",
        "adapter/README.md",
        f"adapter/{FULL_WEIGHTS}",
    ):
        assert f"  {name}\n" in out
    assert 'subfolder="adapter"' in (adapter_dir(run, "sft") / "README.md").read_text()


class HubStub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the hub API on 127.0.0.1: records every request; creates repos, accepts commits."""

    calls: list[tuple[str, str, dict]] = []

    def log_message(self, *args):
        pass

    def _reply(self, body: dict, status: int = 200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_POST(self):
        body = self._body()
        HubStub.calls.append(
            ("POST", self.path, {"authorization": self.headers.get("authorization"), "body": body})
        )
        if self.path == "/api/validate-yaml":
            self._reply({"errors": [], "warnings": []})
        elif self.path == "/api/repos/create":
            self._reply({"url": "http://127.0.0.1/me/phi3v-demo", "name": "me/phi3v-demo"})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                }
            )
        elif "/commit/" in self.path:
            self._reply({"commitUrl": "http://127.0.0.1/me/phi3v-demo/commit/abc", "commitOid": "a" * 40})
        else:
            self._reply({"error": f"unexpected {self.path}"}, 404)

    def do_GET(self):
        HubStub.calls.append(("GET", self.path, {}))
        self._reply({"error": "not found"}, 404)


def test_push_to_hub_against_a_local_stub(exported, monkeypatch):
    run, *_ = exported
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_TOKEN", "hf_stub_token_not_real")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the stub is local; nothing else is reached
    from train.export.hub import push_to_hub

    try:
        report = push_to_hub(
            run, "sft", "me/phi3v-demo", private=True, endpoint=f"http://127.0.0.1:{server.server_address[1]}"
        )
    except Exception as error:  # a huggingface_hub release that needs more endpoints than the stub offers
        pytest.skip(f"the local hub stub does not cover this huggingface_hub release: {error}")
    finally:
        server.shutdown()
    paths = [path for _, path, _ in HubStub.calls]
    assert "/api/repos/create" in paths
    created = next(c for c in HubStub.calls if c[1] == "/api/repos/create")
    assert (
        json.loads(created[2]["body"])["visibility"] == "private"
        and created[2]["authorization"] == "Bearer hf_stub_token_not_real"
    )
    commits = [c for c in HubStub.calls if "/commit/" in c[1]]
    assert len(commits) == 2 and len(report["commits"]) == 2  # merged folder, then the adapter


# ------------------------------------------------------------------------------------------------ stop ids


class Script(LogitsProcessor):
    """Forces the next tokens to a fixed script, whatever the model says."""

    def __init__(self, prompt_length: int, script: list[int]):
        self.prompt_length, self.script = prompt_length, script

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.script[min(step, len(self.script) - 1)]] = 0
        return forced


def test_generate_stops_at_end_for_a_folder_whose_generation_config_says_2(tmp_path):
    model, processor = real_geometry_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    )
    loaded, loaded_processor = models.load(str(tmp_path), dtype="float32")
    end, endoftext = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|end|>", "<|endoftext|>"))
    assert loaded.generation_config.eos_token_id == [end, endoftext] != [2]
    words = processor.tokenizer("Three circles", add_special_tokens=False).input_ids
    prompt = loaded_processor(text=["<|user|>\nHow many?<|end|>\n<|assistant|>\n"])
    length = prompt["input_ids"].shape[1]
    out = loaded.generate(
        **prompt, max_new_tokens=8, do_sample=False, logits_processor=[Script(length, [*words, end, *words])]
    )
    assert out[0, length:].tolist() == [*words, end]
    # A user's own stop ids that already hold the end ids are kept.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, endoftext, 5]}))
    assert Phi3VForCausalLM.from_pretrained(tmp_path).generation_config.eos_token_id == [end, endoftext, 5]


# ------------------------------------------------------------------------------------------------ adapter config


def test_portable_config_drops_new_keys_and_refuses_new_meanings():
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": "^(model.layers.0.self_attn.qkv_proj)$",
        "alora_invocation_tokens": None,
        "lora_bias": False,
        "qalora_group_size": 16,
        "peft_version": "0.21.2",
        "modules_to_save": ["img_projection"],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "runs/x/base",
    }
    out = portable_config(config, target_modules=["model.layers.0.self_attn.qkv_proj"], base_id=PHI3_VISION)
    assert set(out) <= PEFT_011_LORA_KEYS and out["target_modules"] == ["model.layers.0.self_attn.qkv_proj"]
    assert out["base_model_name_or_path"] == PHI3_VISION and out["modules_to_save"] is None
    with pytest.raises(ValueError, match="lora_bias"):
        portable_config({**config, "lora_bias": True}, target_modules=["x"], base_id=PHI3_VISION)


# ------------------------------------------------------------------------------------------------ the real hub files


@needs_hub(PHI3V_HUB.parent)
@pytest.mark.parametrize("folder", [PHI3V_HUB, PHI35V_HUB], ids=["phi3v", "phi35v"])
def test_hub_base_tokenizer_files_are_copied_byte_for_byte(folder, tmp_path):
    processor = Phi3VProcessor.from_pretrained(folder, num_crops=8)
    processor.save_pretrained(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": config.pop("torch_dtype")}))
    repo = "microsoft/" + folder.name
    write_hub_files(tmp_path, remote_repo=repo, base_folder=folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
    hub_pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert {k: v.split("--")[1] for k, v in pre["auto_map"].items()} == hub_pre["auto_map"] and pre[
        "num_crops"
    ] == 8
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: v.split("--")[1] for k, v in written["auto_map"].items()} == config["auto_map"]
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [32007, 32000]


def test_an_adapter_over_a_hub_base_loads_offline_from_the_recorded_or_overridden_folder(
    exported, tmp_path, monkeypatch
):
    """A run on a hub id writes that id as base_model_name_or_path; offline, `adapter_base` finds the local copy (the
    folder recorded at training time, or $PHI3V_BASE_MODEL), and PEFT takes the base model explicitly."""
    import shutil

    from peft import PeftModel

    from models.adapters import BASE_OVERRIDE_ENV, adapter_base

    run, batch, expected, _ = exported
    folder = tmp_path / "adapter"
    shutil.copytree(adapter_dir(run, "sft"), folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": PHI3_VISION}))
    record = json.loads((folder / "base_model.json").read_text())
    assert adapter_base(folder) == record["local_path"] == str((run / "base").resolve())
    (folder / "base_model.json").write_text(json.dumps({**record, "local_path": None}))
    assert adapter_base(folder) == PHI3_VISION
    monkeypatch.setenv(BASE_OVERRIDE_ENV, str(run / "base"))
    base = AutoModelForCausalLM.from_pretrained(adapter_base(folder), dtype=torch.float32)
    base.load_state_dict(load_file(folder / FULL_WEIGHTS), strict=False)
    model = PeftModel.from_pretrained(base, str(folder))
    torch.testing.assert_close(logits_of(model, batch), expected, rtol=1e-5, atol=1e-5)
