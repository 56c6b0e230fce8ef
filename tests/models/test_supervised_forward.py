"""models/phi3v/supervised_forward.py: the SFT loss's forward on real tokens only gives the full forward's logits at
the kept positions and the same gradients, with and without gradient checkpointing, and hands every batch it cannot
take to the model's own forward. Under DDP: tests/models/test_supervised_forward_ddp.py."""

import pytest
import torch

from config.schema import LoraSection, ModelSection
from data.collate import SFTCollator
from models.phi3v.supervised_forward import supervised_logits
from tests.conftest import chat, drawn_image
from train.core.losses import model_inputs, supervised_positions
from train.core.trainable import configure_trainable


def rows(processor, answers=("red", "two blue", "circle", "The answer is three")):
    """SFT rows of different lengths, two with an image, one text-only: the batch is right-padded."""
    out = []
    for i, answer in enumerate(answers):
        images = [drawn_image(40 + 8 * i, 30, seed=i)] if i % 3 != 2 else []
        text = chat(processor, "What colour is the shape?", num_images=len(images), answer=answer)
        enc = processor(text=text, images=images or None, return_tensors="pt", do_normalize=False)
        ids = enc["input_ids"][0].tolist()
        answer_start = len(
            processor.tokenizer(chat(processor, "What colour is the shape?", len(images)))["input_ids"]
        )
        labels = [-100] * answer_start + ids[answer_start:]
        row = {"input_ids": ids, "labels": labels[: len(ids)]}
        if images:
            row.update(pixel_values=enc["pixel_values"], image_sizes=enc["image_sizes"])
        out.append(row)
    return out


def lora_model(tiny_model, checkpointing: bool = False):
    model = configure_trainable(
        tiny_model,
        ModelSection(
            name_or_path="tiny",
            language="lora",
            vision="frozen",
            projector="full",
            gradient_checkpointing=checkpointing,
        ),
        LoraSection(r=4, dropout=0.0),
    )  # dropout would draw different masks
    with torch.no_grad():  # B starts at zero: give the adapter a say in the result
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def loss_and_grads(model, logits_fn, batch):
    keep, targets = supervised_positions(batch["labels"])
    logits = logits_fn(model, model_inputs(batch), keep)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def full_forward(model, inputs, keep):
    return model(**inputs, logits_to_keep=keep, use_cache=False).logits


class FirstLayerRows:
    """The positions each call of the first decoder layer's MLP computes (a recomputation under checkpointing is a
    call too): (tokens, hidden) on the real-token path, B x T on the model's forward."""

    def __init__(self, model):
        mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
        self.calls: list[int] = []
        self.hook = mlp.register_forward_pre_hook(
            lambda _m, args: self.calls.append(args[0].shape[:-1].numel())
        )

    def take(self) -> list[int]:
        calls, self.calls = self.calls, []
        return calls


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_logits_and_gradients_as_the_full_forward(tiny_model, tiny_processor, checkpointing):
    model = lora_model(tiny_model, checkpointing)
    assert all(layer.gradient_checkpointing == checkpointing for layer in tiny_model.model.layers)
    batch = SFTCollator(pad_token_id=tiny_processor.tokenizer.pad_token_id)(rows(tiny_processor))
    assert not batch["attention_mask"].all()  # padding to skip
    rows_seen = FirstLayerRows(model)
    expected, expected_grads = loss_and_grads(model, full_forward, batch)
    padded = batch["input_ids"].numel()
    assert rows_seen.take() == [padded] * (2 if checkpointing else 1)
    got, grads = loss_and_grads(model, supervised_logits, batch)
    # The real-token path ran, and under checkpointing the backward recomputed the layer on the real tokens.
    real = int(batch["attention_mask"].sum())
    assert rows_seen.take() == [real] * (2 if checkpointing else 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected_grads.keys() == grads.keys() and any("img_projection" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_decoder_runs_on_real_tokens_and_the_last_layer_at_kept_positions(tiny_model, tiny_processor):
    batch = SFTCollator(pad_token_id=tiny_processor.tokenizer.pad_token_id)(rows(tiny_processor))
    keep, _ = supervised_positions(batch["labels"])
    seen = {}

    def rows_into(name):
        def hook(_module, args):
            seen[name] = args[0].shape[0]

        return hook

    layers = tiny_model.model.layers
    hooks = [
        layers[0].mlp.register_forward_pre_hook(rows_into("first")),
        layers[-1].mlp.register_forward_pre_hook(rows_into("last")),
    ]
    with torch.no_grad():
        supervised_logits(tiny_model, model_inputs(batch), keep)
    for hook in hooks:
        hook.remove()
    assert seen == {"first": int(batch["attention_mask"].sum()), "last": int(keep.sum())}


@pytest.mark.parametrize("case", ["left padding", "packed", "eager", "cache"])
def test_batches_it_cannot_take_run_the_models_forward(tiny_model, tiny_processor, case):
    collate = SFTCollator(
        pad_token_id=tiny_processor.tokenizer.pad_token_id,
        padding_side="left" if case == "left padding" else "right",
    )
    batch = collate(rows(tiny_processor))
    inputs = model_inputs(batch)
    if case == "packed":
        inputs["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    elif case == "eager":
        tiny_model.config._attn_implementation = "eager"
    keep, _ = supervised_positions(batch["labels"])
    rows_seen = FirstLayerRows(tiny_model)
    with torch.no_grad():
        if case == "cache":
            got = tiny_model(**inputs, logits_to_keep=keep, use_cache=True, real_tokens=True).logits
        else:
            got = supervised_logits(tiny_model, inputs, keep)
    assert rows_seen.take() == [batch["input_ids"].numel()]  # the model's forward: every padded position
    with torch.no_grad():
        torch.testing.assert_close(got, full_forward(tiny_model, inputs, keep))
