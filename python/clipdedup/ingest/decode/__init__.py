"""The decode stage: `base` owns the decoder registry and the shared Pillow decoding; the plugins
below register themselves into it (`pil`, `pil-full`, `dali`, `dali-cpu`)."""

from clipdedup.ingest.decode import dali, pil  # noqa: F401  (register their decoders)
from clipdedup.ingest.decode.base import DECODERS, Batch, DecodeError, decode_pil, iter_batches

__all__ = ["DECODERS", "Batch", "DecodeError", "decode_pil", "iter_batches"]
