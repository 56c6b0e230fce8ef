"""Native Phi-3-Vision / Phi-3.5-vision on transformers' own Phi3 and CLIP modules (no remote code)."""

from .configuration import Phi3VConfig
from .image_processing import Phi3VImageProcessor, crop_grid, hd_canvas_size, num_image_tokens
from .modeling import Phi3VForCausalLM, Phi3VModel
from .processing import Phi3VProcessor

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
