"""Fidelity to the real hub files in ../shared/phi3v/hub (skipped with a reason where they are absent)."""

import json

import pytest
import torch

from models.phi3v import Phi3VConfig, Phi3VForCausalLM, Phi3VProcessor

from ..conftest import PHI3V_HUB, PHI35V_HUB, drawn_image, needs_hub

pytestmark = needs_hub(PHI3V_HUB.parent)


@pytest.mark.parametrize("folder", [PHI3V_HUB, PHI35V_HUB], ids=["phi3v", "phi35v"])
def test_hub_config_parses_unchanged(folder):
    raw = json.loads((folder / "config.json").read_text())
    config = Phi3VConfig(**raw)
    assert config.rope_parameters["rope_type"] == "longrope"
    assert config.rope_parameters["original_max_position_embeddings"] == 4096
    assert config.rope_parameters["short_factor"] == raw["rope_scaling"]["short_factor"]
    assert config.max_position_embeddings == 131072
    assert config.vision_config.num_hidden_layers == 24 and config.vision_config.image_size == 336
    assert config.vision_layer_idx == -2
    assert config._attn_implementation is None  # the file's flash_attention_2 is not taken
    written = config.to_dict()
    assert written["rope_scaling"] == raw["rope_scaling"]
    assert written["embd_layer"] == raw["embd_layer"] and written["img_processor"] == raw["img_processor"]
    assert Phi3VConfig(**written).rope_parameters == config.rope_parameters


def test_full_size_architecture_matches_hub_keys_and_parameter_count():
    index = json.loads((PHI3V_HUB / "model.safetensors.index.json").read_text())
    config = Phi3VConfig(**json.loads((PHI3V_HUB / "config.json").read_text()))
    with torch.device("meta"):
        model = Phi3VForCausalLM(config)
    assert set(model.state_dict()) == set(index["weight_map"])
    assert (
        sum(p.numel() for p in model.parameters()) == 4_146_621_440
    )  # docs/phi3v.md#checkpoint-keys-and-sizes
    assert index["metadata"]["total_size"] == 2 * 4_146_621_440


@pytest.fixture(scope="module")
def hub_processor():
    return Phi3VProcessor.from_pretrained(PHI3V_HUB)


def test_special_ids_and_chat_template(hub_processor):
    tok = hub_processor.tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>", "<|image|>"]
    }
    assert ids == {
        "<|endoftext|>": 32000,
        "<|assistant|>": 32001,
        "<|system|>": 32006,
        "<|end|>": 32007,
        "<|user|>": 32010,
        "<|image|>": 32044,
    }
    assert (tok.bos_token_id, tok.pad_token_id) == (1, 32000)
    assert hub_processor.image_token_id == 32044 and hub_processor.end_token_ids == [32007, 32000]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    assert hub_processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\n"
    )


def test_sft_example_ids_match_the_official_layout(hub_processor):
    # docs/phi3v.md#tokenizer-ids-and-chat-template: [1, 32010, 29871, 13, -1 x N, 1, 29871, 13, 5618 ...], negative ids -> 32044.
    text = "<|user|>\n<|image_1|>\nWhat is shown?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
    ids = hub_processor(text=text, images=[drawn_image(1000, 600)])["input_ids"][0].tolist()
    n = 2353
    assert ids[:4] == [1, 32010, 29871, 13]
    assert ids[4 : 4 + n] == [32044] * n
    assert ids[4 + n :] == [
        1,
        29871,
        13,
        5618,
        338,
        4318,
        29973,
        32007,
        29871,
        13,
        32001,
        319,
        6635,
        29889,
        32007,
        29871,
        13,
    ]


def test_two_images_give_three_bos(hub_processor):
    text = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n"
    out = hub_processor(text=text, images=[drawn_image(640, 480), drawn_image(600, 1000)], num_crops=4)
    ids = out["input_ids"][0].tolist()
    assert ids.count(1) == 3 and ids.count(32044) == 757 * 2
    assert out["image_sizes"].tolist() == [[672, 672], [672, 672]]


def test_text_only_prompt_is_plain_tokenisation(hub_processor):
    text = "<|user|>\nHello<|end|>\n<|assistant|>\n"
    assert hub_processor(text=text)["input_ids"][0].tolist() == hub_processor.tokenizer(text).input_ids
