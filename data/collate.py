"""From planned samples to model batches: a map-style dataset that renders and decodes in DataLoader workers, and
three collators (padded SFT, packed SFT, DPO pairs). Collators never modify the rows they are given.

Rows (what `RenderedDataset[i]` returns, and what the collators take):

- SFT row: `input_ids` list[int], `labels` list[int] (same length, -100 where not supervised), `pixel_values` uint8
  (crops, 3, S, S): the real HD crops of the sample's images in order, `image_sizes` int64 (images, 2): each image's
  padded canvas [H, W], `origin` str. A text-only row has 0 crops and 0 images (the collators also accept a row
  without the two image keys).
- Preference row: `pair` (`data.render.RenderedPair`), `pixel_values`/`image_sizes` of the prompt's images,
  `rejected_pixel_values`/`rejected_image_sizes` of the rejected images of an image-contrast pair (else None),
  `origin` str.

Crops stay uint8 (4x fewer bytes through the worker queues than float32); the model normalises them on its device.

Example (runs as is; `python -c` it or see tests/data/test_collate.py)::

    import io, torch
    from PIL import Image
    from data.collate import RenderedDataset, SFTCollator
    from data.length import plan_lengths
    from data.sample import ImagePart, ImageRef, Origin, SFTSample, TextPart, Turn
    from data.sources import SkipCounter
    from models.phi3v import Phi3VImageProcessor, Phi3VProcessor
    from models.phi3v.tiny import build_tiny_tokenizer

    processor = Phi3VProcessor(Phi3VImageProcessor(num_crops=4, crop_size=32, patch_size=8),
                               build_tiny_tokenizer(["What colour is the shape?", "red"]))
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png, format="PNG")
    sample = SFTSample(turns=(Turn(role="user", parts=(ImagePart(), TextPart("What colour is the shape?"))),
                              Turn(role="assistant", parts=(TextPart("red"),))),
                       images=(ImageRef(data=png.getvalue()),), origin=Origin(dataset="example", row=0))
    planned = plan_lengths([sample], processor, max_length=512, skips=SkipCounter())
    loader = torch.utils.data.DataLoader(RenderedDataset(planned, processor), batch_size=1,
                                         collate_fn=SFTCollator(pad_token_id=processor.tokenizer.pad_token_id))
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    assert batch["image_sizes"].tolist() == [[64, 64]] and int(batch["num_supervised_tokens"]) == 2
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from data.images import DEFAULT_MAX_PIXELS, load_rgb
from data.length import PlannedSample
from data.render import IGNORE_INDEX, AssistantTurns, RenderedPair, render_preference, render_sft
from data.sample import DataError, ImageRef, Origin, SFTSample
from models.phi3v.processing import Phi3VProcessor

PaddingSide = Literal["left", "right"]


# ------------------------------------------------------------------------------------------------ dataset


class RenderedDataset(Dataset):
    """Planned samples -> rows (see the module docstring); `__getitem__` runs in the DataLoader workers.

    Rendering uses the image token counts planned from the headers; decoding checks that the decoded images give the
    same counts (a file changed on disk since planning raises a `DataError` naming the row).
    """

    def __init__(
        self,
        planned: Sequence[PlannedSample],
        processor: Phi3VProcessor,
        *,
        assistant_turns: AssistantTurns = "all",
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.planned = planned
        self.processor = processor
        self.assistant_turns = assistant_turns
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.planned)

    def __getitem__(self, index: int) -> dict[str, Any]:
        plan = self.planned[index]
        if isinstance(plan.sample, SFTSample):
            return self._sft_row(plan)
        return self._preference_row(plan)

    def _sft_row(self, plan: PlannedSample) -> dict[str, Any]:
        sample = plan.sample
        rendered = render_sft(
            sample, self.processor, plan.image_token_counts, assistant_turns=self.assistant_turns
        )
        crops = self._crops(sample.images, plan.image_token_counts, sample.origin, "images")
        return {
            "input_ids": rendered.input_ids,
            "labels": rendered.labels,
            **crops,
            "origin": str(sample.origin),
        }

    def _preference_row(self, plan: PlannedSample) -> dict[str, Any]:
        sample = plan.sample
        pair = render_preference(
            sample, self.processor, plan.image_token_counts, plan.rejected_image_token_counts
        )
        row = {
            "pair": pair,
            **self._crops(sample.images, plan.image_token_counts, sample.origin, "images"),
            "rejected_pixel_values": None,
            "rejected_image_sizes": None,
            "origin": str(sample.origin),
        }
        if sample.rejected_images is not None:
            rejected = self._crops(
                sample.rejected_images, plan.rejected_image_token_counts, sample.origin, "rejected_images"
            )
            row.update(
                rejected_pixel_values=rejected["pixel_values"], rejected_image_sizes=rejected["image_sizes"]
            )
        return row

    def _crops(
        self, refs: Sequence[ImageRef], planned_counts: Sequence[int], origin: Origin, field: str
    ) -> dict[str, torch.Tensor]:
        images = [load_rgb(ref, origin, f"{field}[{k}]", self.max_image_pixels) for k, ref in enumerate(refs)]
        out = self.processor.image_processor(images, do_normalize=False)
        if list(out["num_img_tokens"]) != list(planned_counts):
            raise DataError(
                origin,
                field,
                f"image changed since planning: the decoded images take "
                f"{out['num_img_tokens']} image tokens, the headers gave {list(planned_counts)}. "
                "Fix: do not modify the dataset's files during a run",
            )
        return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}


# ------------------------------------------------------------------------------------------------ helpers


def _check_pad_token_id(pad_token_id: int) -> int:
    # No `pad_token_id or eos_token_id` fallback: 0 is a valid pad id (<unk> in the Phi-3 vocabulary).
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(
            f"pad_token_id must be a token id (int >= 0), got {pad_token_id!r}; pass "
            "processor.tokenizer.pad_token_id"
        )
    return pad_token_id


def _check_padding_side(padding_side: str) -> str:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return padding_side


def _check_rows(rows: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> None:
    if not rows:
        raise ValueError("the collator got an empty batch")
    for i, row in enumerate(rows):
        missing = [key for key in keys if key not in row]
        if missing:
            raise ValueError(
                f"batch row {i} ({row.get('origin', 'no origin')}) lacks {missing}; rows come from "
                "RenderedDataset"
            )


def _check_same_length(ids: Sequence[int], labels: Sequence[int], where: str) -> None:
    if not ids:
        raise ValueError(f"{where}: the row has no tokens")
    if len(ids) != len(labels):
        raise ValueError(
            f"{where}: {len(ids)} input_ids but {len(labels)} labels; they must align token for token"
        )


def pad_sequences(sequences: Sequence[Sequence[int]], value: int, side: PaddingSide) -> torch.Tensor:
    """(B, longest) int64, each sequence padded with `value` on `side`."""
    longest = max(len(sequence) for sequence in sequences)
    out = torch.full((len(sequences), longest), value, dtype=torch.long)
    for b, sequence in enumerate(sequences):
        start = 0 if side == "right" else longest - len(sequence)
        out[b, start : start + len(sequence)] = torch.as_tensor(list(sequence), dtype=torch.long)
    return out


def attention_mask_for(lengths: Sequence[int], side: PaddingSide) -> torch.Tensor:
    """(B, longest) int64: 1 on tokens, 0 on padding."""
    return pad_sequences([[1] * length for length in lengths], 0, side)


def supervised_token_count(labels: torch.Tensor) -> torch.Tensor:
    """Labels the loss counts after the causal shift (position t predicts labels[t + 1]): int64 scalar."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def _image_rows(
    rows: Sequence[Mapping[str, Any]], pixel_key: str = "pixel_values", sizes_key: str = "image_sizes"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(crops, sizes) of each row that has at least one image, in row order."""
    found = []
    for row in rows:
        sizes = row.get(sizes_key)
        if sizes is not None and sizes.shape[0] > 0:
            found.append((row[pixel_key], sizes))
    return found


def _with_images(batch: dict[str, Any], parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """`batch` plus the concatenated crops and sizes; no image keys when there is no image."""
    if parts:
        batch["pixel_values"] = torch.cat([crops for crops, _ in parts])
        batch["image_sizes"] = torch.cat([sizes for _, sizes in parts]).to(torch.long)
    return batch


# ------------------------------------------------------------------------------------------------ collators


class SFTCollator:
    """SFT rows -> one padded batch for `model(**batch)`.

    Keys:
      - `input_ids` (B, T) int64, padded with `pad_token_id` on `padding_side`;
      - `attention_mask` (B, T) int64: 1 on tokens, 0 on padding;
      - `labels` (B, T) int64: the rows' labels, -100 on padding;
      - `pixel_values` (total_crops, 3, S, S) uint8: every image's crops, in row order then image order (the order the
        model fills the image slots, row-major); absent when no row has an image;
      - `image_sizes` (num_images, 2) int64, the same images' canvases [H, W]; absent likewise;
      - `num_supervised_tokens` int64 scalar: `(labels[:, 1:] != -100).sum()`, the tokens the shifted loss counts
        (the loop divides the summed loss by the step's total of these).

    Text-only and image rows mix in one batch.
    """

    def __init__(self, pad_token_id: int, padding_side: PaddingSide = "right"):
        self.pad_token_id = _check_pad_token_id(pad_token_id)
        self.padding_side = _check_padding_side(padding_side)

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_rows(rows, ("input_ids", "labels"))
        for i, row in enumerate(rows):
            _check_same_length(row["input_ids"], row["labels"], f"batch row {i} ({row.get('origin', '')})")
        labels = pad_sequences([row["labels"] for row in rows], IGNORE_INDEX, self.padding_side)
        batch = {
            "input_ids": pad_sequences(
                [row["input_ids"] for row in rows], self.pad_token_id, self.padding_side
            ),
            "attention_mask": attention_mask_for([len(row["input_ids"]) for row in rows], self.padding_side),
            "labels": labels,
            "num_supervised_tokens": supervised_token_count(labels),
        }
        return _with_images(batch, _image_rows(rows))


class PackedSFTCollator:
    """SFT rows -> one padding-free packed sequence of at most `max_tokens` tokens.

    Keys:
      - `input_ids` (1, N) int64: the rows' ids back to back, N = total tokens;
      - `labels` (1, N) int64: the rows' labels, with -100 at each row's first token, so that no token learns to
        predict the next sample (with the causal shift, the label at a row's first token is predicted from the
        previous row's last token);
      - `position_ids` (1, N) int64: 0, 1, ... restarting at every row;
      - `cu_seqlens` (rows + 1,) int32: cumulative row lengths [0, len0, len0 + len1, ..., N] (flash-attention
        varlen layout; SDPA ignores it);
      - `pixel_values`, `image_sizes`, `num_supervised_tokens`: as `SFTCollator`;
      - `use_cache` False (a bool, not a tensor).

    No `attention_mask`: for SDPA and eager, transformers 5.24 (`masking_utils._preprocess_mask_arguments`) builds
    the block-diagonal causal mask from `position_ids` that restart, but only when no attention mask is passed *and
    no KV cache exists*; flash-attention-2 reads the restarts from `position_ids` itself (varlen kernel). Phi-3's
    config has `use_cache: true`, so a plain `model(input_ids=..., position_ids=...)` creates a cache and, under
    SDPA, silently attends across samples (checked: the second sample's logits move by ~2 on the tiny model). The
    batch therefore carries `use_cache=False`, and `model(**batch)` gives each sample the logits it gets alone
    (tests/data/test_collate.py checks it with SDPA on the tiny model). A 4D mask would also work but costs N^2 memory
    and rules out flash-attention's varlen path.

    Phi-3's long/short RoPE factors are picked per forward from the largest position id (> 4096 -> long), as in a
    padded batch: a short row packed with a row over 4096 tokens runs with the long factors.
    """

    def __init__(self, max_tokens: int):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens!r}")
        self.max_tokens = max_tokens

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_rows(rows, ("input_ids", "labels"))
        lengths = [len(row["input_ids"]) for row in rows]
        if sum(lengths) > self.max_tokens:
            raise ValueError(
                f"the batch holds {sum(lengths)} tokens ({len(rows)} rows), over the packing budget "
                f"max_tokens={self.max_tokens}; batch with data.samplers.PackedBatchSampler (what `data.packing: true` "
                "uses), which fills each pack up to the budget"
            )
        ids, labels, positions = [], [], []
        for i, row in enumerate(rows):
            _check_same_length(row["input_ids"], row["labels"], f"batch row {i} ({row.get('origin', '')})")
            ids += row["input_ids"]
            labels += [IGNORE_INDEX, *row["labels"][1:]]
            positions += range(len(row["input_ids"]))
        labels_1N = torch.tensor([labels], dtype=torch.long)
        batch = {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": labels_1N,
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seqlens": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
            "num_supervised_tokens": supervised_token_count(labels_1N),
            "use_cache": False,
        }
        return _with_images(batch, _image_rows(rows))


class DPOCollator:
    """Preference rows -> one padded batch of 2B sequences that carries each image once.

    Keys:
      - `input_ids` (2B, T) int64: rows 0..B-1 are prompt + chosen, rows B..2B-1 the same pairs' (rejected prompt +)
        rejected, padded with `pad_token_id` on `padding_side`;
      - `attention_mask` (2B, T) int64; `labels` (2B, T) int64: -100 over prompts, trailing newlines and padding;
      - `pixel_values` (total_crops, 3, S, S) uint8 and `image_sizes` (num_images, 2) int64: each pair's prompt
        images once (chosen and rejected share them), followed by the pair's own rejected images for an
        image-contrast pair; absent when the batch has no image;
      - `sequence_images` list[list[int]]: for each of the 2B rows, the indices into `image_sizes` of the images
        its slots show, in slot order.

    One vision pass per batch: encode `pixel_values` once (`features = model.model.vision_embed_tokens.per_image(pixel_values,
    image_sizes)`, one tensor per image), then feed the 2B rows `image_features=[features[i] for row in
    sequence_images for i in row]`, which fills the slots row-major as the model expects.

    With `share_prompt` (the default), and when no pair of the batch has its own rejected images, the batch also
    carries the prefix-sharing layout (`shared_layout`, keys `shared_*`): B rows of `prompt + chosen + rejected`, so
    that the LM computes each prompt once instead of twice (the prompt holds most tokens: 93% image slots at
    num_crops 16). `train.preference.stage_loss.DPOLoss` runs it; the 2B-row keys stay for the paths that need them (mDPO's term,
    flash-attention-2, which takes no block mask).
    """

    def __init__(self, pad_token_id: int, padding_side: PaddingSide = "right", share_prompt: bool = True):
        self.pad_token_id = _check_pad_token_id(pad_token_id)
        self.padding_side = _check_padding_side(padding_side)
        self.share_prompt = share_prompt

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        _check_rows(rows, ("pair", "pixel_values", "image_sizes"))
        pairs: list[RenderedPair] = [row["pair"] for row in rows]
        sequences = [pair.chosen_sequence() for pair in pairs] + [pair.rejected_sequence() for pair in pairs]
        lengths = [len(ids) for ids, _ in sequences]
        labels = pad_sequences([labels for _, labels in sequences], IGNORE_INDEX, self.padding_side)
        images, chosen_images, rejected_images = self._images(rows)
        batch = {
            "input_ids": pad_sequences([ids for ids, _ in sequences], self.pad_token_id, self.padding_side),
            "attention_mask": attention_mask_for(lengths, self.padding_side),
            "labels": labels,
            "sequence_images": chosen_images + rejected_images,
        }
        if self.share_prompt and not any(pair.has_rejected_images for pair in pairs):
            batch.update(shared_layout(pairs, self.pad_token_id))
        return _with_images(batch, images)

    @staticmethod
    def _images(rows: Sequence[Mapping[str, Any]]) -> tuple[list, list[list[int]], list[list[int]]]:
        """The batch's unique images as (crops, sizes) parts, and the image indices of the chosen and rejected rows."""
        parts, chosen, rejected, num_images = [], [], [], 0
        for row in rows:
            shared = list(range(num_images, num_images + row["image_sizes"].shape[0]))
            num_images += len(shared)
            if shared:
                parts.append((row["pixel_values"], row["image_sizes"]))
            own = shared
            if row["pair"].has_rejected_images:
                own = list(range(num_images, num_images + row["rejected_image_sizes"].shape[0]))
                num_images += len(own)
                if own:
                    parts.append((row["rejected_pixel_values"], row["rejected_image_sizes"]))
            chosen.append(shared)
            rejected.append(list(own))
        return parts, chosen, rejected


SEGMENT_PROMPT, SEGMENT_CHOSEN, SEGMENT_REJECTED, SEGMENT_PAD = 0, 1, 2, 3


def shared_layout(pairs: Sequence[RenderedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The prefix-sharing layout of B pairs that share their prompt: one row per pair, `prompt + chosen + rejected`,
    right-padded, with what a loss needs to read both completions' log-probs from one forward pass.

    Keys (L = the longest `prompt + chosen + rejected`, N = kept positions, S = supervised tokens of both completions):
      - `shared_input_ids` (B, L) int64;
      - `shared_position_ids` (B, L) int64: prompt 0..p-1, chosen p..p+c-1, rejected p..p+r-1 (each completion at
        the positions it has in the 2B-row layout), padding 0. The largest position + 1 is the 2B-row batch's padded
        length, so Phi-3's long/short RoPE switch (taken from the largest position id) is the same in both layouts;
      - `shared_segments` (B, L) int64: 0 prompt, 1 chosen, 2 rejected, 3 padding. Token q attends token k <= q when
        k is in the prompt or in q's own segment (`train.core.losses.prefix_sharing_mask`): the rejected completion never
        sees the chosen one, and each completion sees exactly the prompt it sees in the 2B-row layout;
      - `shared_keep` (B, L) bool: the positions whose next-token logits a supervised token needs (transformers'
        `logits_to_keep` as a boolean mask: the logits come back flattened, row-major, N x vocab). The prompt's last
        position is kept once and predicts the first token of both completions;
      - `shared_token_index` (S,) int64 into those N logits, `shared_targets` (S,) the token ids, and
        `shared_sequence` (S,) the 2B-row sequence (chosen 0..B-1, rejected B..2B-1) each token counts for;
      - `shared_counts` (2B,) int64: supervised tokens per 2B-row sequence (counted here, on the CPU, so that the
        loss needs no device sync for them).
    """
    rows = len(pairs)
    longest = max(len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids) for pair in pairs)
    ids = torch.full((rows, longest), pad_token_id, dtype=torch.long)
    positions = torch.zeros((rows, longest), dtype=torch.long)
    segments = torch.full((rows, longest), SEGMENT_PAD, dtype=torch.long)
    keep = torch.zeros((rows, longest), dtype=torch.bool)
    wanted: list[tuple[int, int, int, int]] = []  # (row, position, target, 2B-row sequence)
    for b, pair in enumerate(pairs):
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        if p == 0:
            raise ValueError(
                "a preference pair has an empty prompt: its first completion token has no prediction"
            )
        ids[b, : p + c + r] = torch.tensor(
            pair.prompt_ids + pair.chosen_ids + pair.rejected_ids, dtype=torch.long
        )
        positions[b, : p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        segments[b, :p] = SEGMENT_PROMPT
        segments[b, p : p + c] = SEGMENT_CHOSEN
        segments[b, p + c : p + c + r] = SEGMENT_REJECTED
        for start, labels, sequence in ((p, pair.chosen_labels, b), (p + c, pair.rejected_labels, rows + b)):
            for k, label in enumerate(labels):
                if label != IGNORE_INDEX:
                    wanted.append((b, p - 1 if k == 0 else start + k - 1, label, sequence))
    for b, position, _, _ in wanted:
        keep[b, position] = True
    flat_index = torch.full((rows, longest), -1, dtype=torch.long)  # row-major rank of each kept position
    flat_index[keep] = torch.arange(int(keep.sum()))
    return {
        "shared_input_ids": ids,
        "shared_position_ids": positions,
        "shared_segments": segments,
        "shared_keep": keep,
        "shared_token_index": torch.tensor(
            [int(flat_index[b, t]) for b, t, _, _ in wanted], dtype=torch.long
        ),
        "shared_targets": torch.tensor([target for _, _, target, _ in wanted], dtype=torch.long),
        "shared_sequence": torch.tensor([sequence for _, _, _, sequence in wanted], dtype=torch.long),
        "shared_counts": torch.bincount(
            torch.tensor([sequence for _, _, _, sequence in wanted], dtype=torch.long), minlength=2 * rows
        ),
    }
