"""The encode stage: `base` owns the encoder registry and `load_encoder`; the plugins below register
themselves into it (`open_clip`, `builtin:dct`); `cpu_forward` and `batch_runner` serve open_clip."""

from clipdedup.ingest.encode import dct, open_clip  # noqa: F401  (register their encoders)
from clipdedup.ingest.encode.base import (
    DEFAULT_MODEL,
    ENCODERS,
    Encoder,
    canonical_model_id,
    default_threshold,
    load_encoder,
)

__all__ = ["DEFAULT_MODEL", "ENCODERS", "Encoder", "canonical_model_id", "default_threshold", "load_encoder"]
