"""The tiny Phi-3-V-shaped model: forward, backward, generate, save/load, hub layout, LoRA with checkpointing."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from models.phi3v import Phi3VForCausalLM
from models.phi3v.modeling import check_attn_implementation

from ..conftest import chat, drawn_image

LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def image_batch(processor, texts_images, **kwargs):
    texts = [chat(processor, q, num_images=len(ims)) for q, ims in texts_images]
    return processor(text=texts, images=[ims for _, ims in texts_images], **kwargs)


def test_forward_shapes_and_image_sensitivity(tiny_model, tiny_processor):
    batch = image_batch(tiny_processor, [("What colour is the shape?", [drawn_image(64, 48)])])
    logits = tiny_model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, tiny_model.config.vocab_size)
    other = image_batch(tiny_processor, [("What colour is the shape?", [drawn_image(64, 48, seed=3)])])
    assert not torch.allclose(tiny_model(**other).logits[0, -1], logits[0, -1])


def test_uint8_and_float_pixels_give_the_same_logits(tiny_model, tiny_processor):
    pairs = [("Describe the image.", [drawn_image(80, 40)])]
    as_uint8 = image_batch(tiny_processor, pairs, do_normalize=False)
    as_float = image_batch(tiny_processor, pairs)
    assert as_uint8["pixel_values"].dtype == torch.uint8
    assert torch.equal(tiny_model(**as_uint8).logits, tiny_model(**as_float).logits)


def test_inputs_are_not_mutated_and_a_second_forward_is_identical(tiny_model, tiny_processor):
    batch = image_batch(tiny_processor, [("Describe the image.", [drawn_image(64, 64)])], do_normalize=False)
    copies = {k: v.clone() for k, v in batch.items()}
    first = tiny_model(**batch).logits
    second = tiny_model(**batch).logits
    assert all(torch.equal(batch[k], copies[k]) for k in batch)
    assert torch.equal(first, second)


def test_batched_left_and_right_padding_match_single_rows(tiny_model, tiny_processor):
    pairs = [
        ("Compare the two images.", [drawn_image(64, 48), drawn_image(40, 90, seed=1)]),
        ("How many shapes are there?", [drawn_image(50, 50, seed=2)]),
        ("Describe the image.", []),
    ]
    singles = [tiny_model(**image_batch(tiny_processor, [p])).logits[0, -1] for p in pairs]
    for side in ("left", "right"):
        batch = image_batch(tiny_processor, pairs, padding_side=side)
        logits = tiny_model(**batch).logits
        lengths = batch["attention_mask"].sum(1)
        for row, single in enumerate(singles):
            last = -1 if side == "left" else int(lengths[row]) - 1
            torch.testing.assert_close(logits[row, last], single, rtol=1e-4, atol=1e-5)


def test_generate_with_cache_equals_greedy_loop_and_stops_at_end(tiny_model, tiny_processor):
    batch = image_batch(tiny_processor, [("What colour is the shape?", [drawn_image(64, 48)])])
    prompt_len = batch["input_ids"].shape[1]
    generated = tiny_model.generate(**batch, max_new_tokens=6, do_sample=False)[0, prompt_len:]
    ids = batch["input_ids"]
    for _ in range(len(generated)):
        step = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
        next_id = tiny_model(**step).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    assert ids[0, prompt_len:].tolist() == generated.tolist()
    end_ids = tiny_model.generation_config.eos_token_id
    assert tiny_processor.tokenizer.convert_tokens_to_ids("<|end|>") in end_ids


def test_backward_reaches_lm_projector_and_tower(tiny_model, tiny_processor):
    tiny_model.train()
    batch = image_batch(tiny_processor, [("Describe the image.", [drawn_image(64, 48)])], do_normalize=False)
    loss = tiny_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    named = dict(tiny_model.named_parameters())
    for name in [
        "model.layers.0.self_attn.qkv_proj.weight",
        "model.vision_embed_tokens.img_projection.0.weight",
        "model.vision_embed_tokens.sub_GN",
        "model.vision_embed_tokens.glb_GN",
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight",
    ]:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    # The last CLIP layer and post_layernorm are never run (the features come from layer -2): frozen, no gradient.
    unused = "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.2.mlp.fc1.weight"
    assert not named[unused].requires_grad and named[unused].grad is None


def test_lora_with_gradient_checkpointing_trains_only_adapters(tiny_model, tiny_processor):
    tiny_model.requires_grad_(False)
    tiny_model.activation_checkpointing_enable()
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS))
    peft_model.train()
    batch = image_batch(tiny_processor, [("Describe the image.", [drawn_image(64, 48)])], do_normalize=False)
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    lora_b = {n: p for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 4 * tiny_model.config.num_hidden_layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values())
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)
    # CLIP's out_proj must not be caught by the o_proj target.
    assert not any("vision" in n for n in lora_b)


def test_save_and_load_give_identical_logits(tiny_model, tiny_processor, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi3_v" and config["architectures"] == ["Phi3VForCausalLM"]
    assert (
        set(config["rope_scaling"]) == {"type", "short_factor", "long_factor"}
        and config["rope_scaling"]["type"] == "su"
    )
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = image_batch(tiny_processor, [("Describe the image.", [drawn_image(64, 48)])])
    assert torch.equal(loaded(**batch).logits, tiny_model(**batch).logits)
    assert loaded.config._attn_implementation == "sdpa"


def test_hub_layout_checkpoint_in_shards_loads(tiny_model, tiny_processor, tmp_path):
    """Two shards plus model.safetensors.index.json with the hub's key names, as on the hub."""
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in halves.items():
        save_file({k: state[k] for k in names}, tmp_path / file, metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
        "weight_map": {k: f for f, names in halves.items() for k in names},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 11]])
    assert torch.equal(loaded(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_incomplete_checkpoint_is_refused(tiny_model, tmp_path):
    state = {k: v.contiguous() for k, v in tiny_model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(tiny_model.config.to_dict()))
    with pytest.raises(ValueError, match="model.norm.weight"):
        Phi3VForCausalLM.from_pretrained(tmp_path)


def test_slot_and_feature_count_mismatch_is_a_clear_error(tiny_model, tiny_processor):
    batch = image_batch(tiny_processor, [("Describe the image.", [drawn_image(64, 48)])])
    batch["input_ids"] = batch["input_ids"][:, :-40]
    batch["attention_mask"] = batch["attention_mask"][:, :-40]
    with pytest.raises(ValueError, match="image slots"):
        tiny_model(**batch)


def test_attn_implementation_choices():
    check_attn_implementation("sdpa")
    check_attn_implementation("eager")
    with pytest.raises(ValueError, match="must be one of"):
        check_attn_implementation("flex")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="flash-attn package"):
            check_attn_implementation("flash_attention_2")


def test_eager_and_sdpa_agree(tiny_tokenizer, tiny_processor):
    from models.phi3v.tiny import tiny_config

    from ..conftest import deterministic_init_

    outs = []
    for impl in ("eager", "sdpa"):
        config = tiny_config(tiny_tokenizer)
        config._attn_implementation = impl
        model = Phi3VForCausalLM(config)
        deterministic_init_(model)
        batch = image_batch(tiny_processor, [("Describe the image.", [drawn_image(64, 48)])])
        outs.append(model.eval()(**batch).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_loaded_model_normalises_uint8_pixels_like_the_saved_one(tiny_model, tiny_processor, tmp_path):
    # Regression: state that is not in the checkpoint (e.g. non-persistent buffers) must not come back
    # uninitialised from from_pretrained.
    tiny_model.save_pretrained(tmp_path)
    loaded = Phi3VForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = image_batch(tiny_processor, [("Describe the image.", [drawn_image(64, 48)])], do_normalize=False)
    assert torch.equal(loaded(**batch).logits, tiny_model(**batch).logits)
