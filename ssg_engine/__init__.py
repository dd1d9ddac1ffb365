"""ssg-engine: fast sampling of multi-scale visual autoregressive (VAR) models, with Scaled Spatial Guidance."""
from .config import AssumedSettingWarning, ModelConfig
from .guidance import SSG, dse, dse_operator, prior, ssg_logits
from .models import VQVAE, VARTransformer
from .params import SamplingParams
from .pipeline import NonFiniteLogitsError
from .sampler import VAR, SampleOutput, sample_reference
from .models.infinity import InfinityRequest, InfinityTransformer, PaddedText, TextFeatures, scale_schedule
from .infinity_sampler import InfinitySampleOutput, sample_infinity_reference
from .engine import Engine
from .api import generate
from .loading import CheckpointError, build_models, checkpoint_family, load_infinity, load_models, random_models
from .plan import plan

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "AssumedSettingWarning", "SSG", "dse", "dse_operator", "prior", "ssg_logits", "CheckpointError", "build_models",
    "load_models", "load_infinity", "checkpoint_family", "random_models", "VAR", "VARTransformer", "VQVAE", "SamplingParams", "NonFiniteLogitsError",
    "SampleOutput", "generate", "sample_reference", "Engine", "plan", "InfinityTransformer", "InfinityRequest",
    "TextFeatures", "PaddedText", "scale_schedule", "InfinitySampleOutput", "sample_infinity_reference",
]
