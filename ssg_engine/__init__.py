"""ssg-engine: fast sampling of multi-scale visual autoregressive (VAR) models, with Scaled Spatial Guidance."""
from .config import ModelConfig
from .guidance import SSG, dse, dse_operator, prior, ssg_logits
from .loading import CheckpointError, build_models, load_models, random_models
from .models import VAR, VQVAE
from .sampler import SampleOutput, generate, sample_reference

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "SSG", "dse", "dse_operator", "prior", "ssg_logits", "CheckpointError", "build_models",
    "load_models", "random_models", "VAR", "VQVAE", "SampleOutput", "generate", "sample_reference",
]
