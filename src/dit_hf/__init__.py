"""dit-hf: Diffusion Transformers as diffusers models, trained with accelerate."""

from .modeling_dit import DIT_PRESETS, DiTModel, DiTModelOutput
from .pipeline_dit import DiTPipeline

__version__ = "0.1.0"
__all__ = ["DIT_PRESETS", "DiTModel", "DiTModelOutput", "DiTPipeline", "__version__"]
