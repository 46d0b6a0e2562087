"""clip-image-deduper: near-duplicate images by CLIP embeddings, at the scale of millions of files.

The library behind the commands:
    find_pairs(x, threshold, *, y=None, backend=None) -> (pairs, distances)
    load_db(db_dir) -> (paths, embeddings)
    update_db(image_dir, db_dir, model_id, ...) -> UpdateSummary
    default_threshold(model_id) -> float
"""

__version__ = "0.1.0"

from clipdedup.db import load_db  # noqa: E402
from clipdedup.ingest.encode.base import default_threshold  # noqa: E402
from clipdedup.ingest.update import update_db  # noqa: E402
from clipdedup.match import find_pairs  # noqa: E402

__all__ = ["__version__", "default_threshold", "find_pairs", "load_db", "update_db"]
