"""dit-hf: Diffusion Transformers as diffusers models, trained with accelerate."""

from .modeling_dit import DIT_PRESETS, RECIPE_PRESETS, DiTModel, DiTModelOutput
from .objective import make_objective, make_scheduler
from .pipeline_dit import DiTPipeline

__version__ = "0.1.0"
__all__ = [
    "DIT_PRESETS",
    "RECIPE_PRESETS",
    "DiTModel",
    "DiTModelOutput",
    "DiTPipeline",
    "make_objective",
    "make_scheduler",
    "__version__",
]
