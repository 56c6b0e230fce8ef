"""Native Phi-3-Vision / Phi-3.5-vision on transformers' own Phi3 and CLIP modules (no remote code)."""

from .configuration import Phi3VConfig
from .image_processing import Phi3VImageProcessor, crop_grid, hd_canvas_size, num_image_tokens
from .modeling import Phi3VForCausalLM, Phi3VModel
from .processing import Phi3VProcessor


def register_auto_classes() -> None:
    """`phi3_v` in transformers' Auto classes (config, causal LM, image-text-to-text, processor),
    so `AutoModelForCausalLM.from_pretrained(folder)`, `AutoProcessor.from_pretrained(folder)` and
    `peft.AutoPeftModelForCausalLM` load Phi-3-V folders natively. A folder's `auto_map` (the hub's remote code)
    is then used only with `trust_remote_code=True`. Not `AutoImageProcessor`: it takes only `BaseImageProcessor`
    subclasses; `Phi3VImageProcessor.from_pretrained(folder)` loads the image processor directly."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    AutoConfig.register(Phi3VConfig.model_type, Phi3VConfig, exist_ok=True)
    AutoModelForCausalLM.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    AutoModelForImageTextToText.register(Phi3VConfig, Phi3VForCausalLM, exist_ok=True)
    AutoProcessor.register(Phi3VConfig, Phi3VProcessor, exist_ok=True)


register_auto_classes()

__all__ = [
    "Phi3VConfig",
    "Phi3VForCausalLM",
    "Phi3VImageProcessor",
    "Phi3VModel",
    "Phi3VProcessor",
    "crop_grid",
    "hd_canvas_size",
    "num_image_tokens",
]
