"""Phi3VProcessor: the hub chat template, `<|image_N|>` tags validated, token ids exactly as the official processor
emits them except that image slots carry the positive `<|image|>` id, batched, padded left or right.

Token layout (docs/phi3v.md#token-layout): the prompt is split at its `<|image_N|>` tags and every text chunk is tokenised on
its own, so each chunk starts with its own `<s>` (the text after an image starts `<s> ▁ \\n ...`); tag N becomes
`num_image_tokens(image N)` slots. Only the real HD crops of each image are returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from .configuration import IMAGE_TOKEN
from .image_processing import Phi3VImageProcessor

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
END_TOKENS = ("<|end|>", "<|endoftext|>")


class Phi3VProcessor(ProcessorMixin):
    """`processor(text=..., images=..., return_tensors="pt")` returns what `Phi3VForCausalLM.forward` and
    `generate` take as `**kwargs`:

    - `input_ids` (B, T) int64: chunk-wise tokenisation as the official processor, image slots = `<|image|>` id;
    - `attention_mask` (B, T) int64: 0 on padding;
    - `pixel_values` (total_crops, 3, S, S): the real sub-crops of all images of the batch, in order (sample, then
      appearance); float32 normalised, or uint8 with `do_normalize=False` (the model normalises on its device);
    - `image_sizes` (num_images, 2) int64: each image's padded canvas [H, W]; its crop grid is H/S x W/S.

    Keys `pixel_values`/`image_sizes` are absent when no image is given. `text` is a string or a list of strings;
    `images` a flat list in order, or one list per text.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self, image_processor: Phi3VImageProcessor, tokenizer: PreTrainedTokenizerFast, chat_template=None
    ):
        # ProcessorMixin.__init__ type-checks its parts against transformers' auto classes, which know nothing of
        # this image processor; set the parts directly and keep the mixin for its isinstance contract (TRL).
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or tokenizer.chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMAGE_TOKEN} token")
        self.end_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS]

    # ---- loading and saving -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, num_crops: int | None = None, revision: str | None = None, **_
    ):
        """From a local folder or a hub id holding `tokenizer.json` and `preprocessor_config.json` (no remote code)."""
        folder = resolve_folder(path, revision)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
        config_file = folder / "preprocessor_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        image_processor = Phi3VImageProcessor.from_dict(config)
        if num_crops is not None:
            image_processor.num_crops = num_crops
        return cls(image_processor, tokenizer)

    def save_pretrained(self, path: str | Path, **_) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(path))
        (path / "preprocessor_config.json").write_text(
            json.dumps(self.image_processor.to_dict(), indent=2) + "\n"
        )

    # ---- chat template ------------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, tokenize: bool = False, **kwargs
    ) -> str:
        """The hub template on messages whose content is a string or a list of `{"type": "text"|"image"}` parts.

        An image part becomes `<|image_k|>\\n` (k counts images across the conversation), the layout of the
        official examples (`<|user|>\\n<|image_1|>\\n{prompt}<|end|>\\n`). Returns the prompt string.
        """
        if tokenize:
            raise ValueError(
                "apply_chat_template returns text; tokenise it with processor(text=..., images=...)"
            )
        flat, count = [], 0
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                pieces = []
                for part in content:
                    if part.get("type") == "image":
                        count += 1
                        pieces.append(f"<|image_{count}|>\n")
                    else:
                        pieces.append(part.get("text") or "")
                content = "".join(pieces)
            flat.append({"role": message["role"], "content": content})
        return self.tokenizer.apply_chat_template(
            flat,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    # ---- tokenisation -------------------------------------------------------------------------------------
    def num_image_tokens(self, width: int, height: int, num_crops: int | None = None) -> int:
        return self.image_processor.num_image_tokens(width, height, num_crops)

    def encode_prompt(
        self,
        text: str,
        image_token_counts: Sequence[int],
        add_special_tokens: bool = True,
        where: str = "prompt",
    ) -> list[int]:
        """One prompt -> ids; its tags must read <|image_1|> ... <|image_n|> in order, n = len(image_token_counts)."""
        tags = [int(m) for m in IMAGE_TAG.findall(text)]
        if tags != list(range(1, len(image_token_counts) + 1)):
            raise ValueError(
                f"{where}: image tags {[f'<|image_{t}|>' for t in tags]} do not match the "
                f"{len(image_token_counts)} image(s) given; tags must be <|image_1|> ... <|image_n|>, each once, "
                f"in order, one per image"
            )
        chunks = IMAGE_TAG.split(text)[::2]
        if any(IMAGE_TOKEN in chunk for chunk in chunks):
            raise ValueError(
                f"{where}: the text holds a literal {IMAGE_TOKEN}; write images as <|image_N|> tags"
            )
        ids: list[int] = []
        for i, chunk in enumerate(chunks):
            ids += self.tokenizer(chunk, add_special_tokens=add_special_tokens).input_ids
            if i < len(image_token_counts):
                ids += [self.image_token_id] * image_token_counts[i]
        return ids

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence | Image.Image | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
        num_crops: int | None = None,
        do_normalize: bool | None = None,
        **kwargs,
    ) -> dict:
        if text is None:
            raise ValueError("Phi3VProcessor needs text=...; images are referenced by <|image_N|> tags in it")
        texts = [text] if isinstance(text, str) else list(text)
        per_text = split_images(images, texts)
        flat = [im for group in per_text for im in group]
        image_inputs = (
            self.image_processor(flat, num_crops=num_crops, do_normalize=do_normalize) if flat else None
        )
        counts = iter(image_inputs["num_img_tokens"] if image_inputs else [])
        rows = [
            self.encode_prompt(t, [next(counts) for _ in group], add_special_tokens, where=f"text[{i}]")
            for i, (t, group) in enumerate(zip(texts, per_text))
        ]
        out = self.pad(rows, padding, padding_side or self.tokenizer.padding_side, return_tensors)
        if image_inputs is not None:
            out["pixel_values"] = image_inputs["pixel_values"]
            out["image_sizes"] = image_inputs["image_sizes"]
        return out

    def pad(self, rows: list[list[int]], padding, padding_side: str, return_tensors: str | None) -> dict:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        longest = max(len(r) for r in rows)
        if (padding is False or padding == "do_not_pad") and len({len(r) for r in rows}) > 1:
            if return_tensors is not None:
                raise ValueError("texts of different lengths need padding=True to become one tensor")
            return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        pad_id = self.tokenizer.pad_token_id
        ids, mask = [], []
        for r in rows:
            fill = longest - len(r)
            ids.append([pad_id] * fill + r if padding_side == "left" else r + [pad_id] * fill)
            mask.append([0] * fill + [1] * len(r) if padding_side == "left" else [1] * len(r) + [0] * fill)
        if return_tensors is None:
            return {"input_ids": ids, "attention_mask": mask}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes"]


def split_images(images, texts: list[str]) -> list[list]:
    """Images per text: a flat list is handed out in order by each text's tag count; a list of lists is taken as is."""
    if images is None:
        return [[] for _ in texts]
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if images and all(isinstance(g, (list, tuple)) for g in images):
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} image lists for {len(texts)} texts")
        return [list(g) for g in images]
    groups, start = [], 0
    for text in texts:
        n = len(IMAGE_TAG.findall(text))
        groups.append(images[start : start + n])
        start += n
    if start != len(images):
        raise ValueError(f"the texts hold {start} <|image_N|> tags but {len(images)} images were given")
    return groups


def resolve_folder(path: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id, fetched with huggingface_hub (config, tokenizer and weights)."""
    local = Path(path)
    if local.is_dir():
        return local
    return hub_snapshot(path, revision, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])


def looks_local(path: str | Path) -> bool:
    """A path meant as a local folder: absolute, `./`/`../`/`~`-relative, or more than one `/` (a hub id is
    `owner/name`)."""
    text = str(path)
    return (
        isinstance(path, Path)
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
        or "\\" in text
        or Path(text).exists()
    )


def hub_snapshot(path: str | Path, revision: str | None, *, allow_patterns: list[str]) -> Path:
    """The hub id's files (downloaded, or from the cache); a missing local folder or an uncached id offline is a
    FileNotFoundError that says which."""
    if looks_local(path):
        where = Path(str(path)).expanduser()
        what = "is not a folder" if where.exists() else "no such folder"
        raise FileNotFoundError(
            f"model {str(path)!r}: {what} ({where.absolute()}). Fix: point model.name_or_path at "
            "a checkpoint folder (with config.json), or give a hub id such as "
            "microsoft/Phi-3.5-vision-instruct"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(path), revision=revision, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError as error:
        raise FileNotFoundError(
            f"model {str(path)!r}{f' at revision {revision}' if revision else ''} is not in the local hub cache, and "
            "downloading is off (HF_HUB_OFFLINE=1, or the hub is unreachable). Fix: download it once online "
            f"(huggingface-cli download {path}), or point model.name_or_path at a local folder"
        ) from error
