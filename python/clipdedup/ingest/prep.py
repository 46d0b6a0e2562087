"""Model input preparation shared by every decoder: geometry on the decoder side, normalisation last.

A decoder delivers each image resized and cropped to the model's input size as uint8 HWC; the
encoder turns a whole batch into normalised float on its device in one step. That keeps the
per-image work (in decoder threads, or in DALI) small, moves 4x fewer bytes to a GPU than float32,
and lets the PIL path and the DALI path share one normalisation.

`PrepSpec` holds what open_clip's preprocessing does (size, resize mode, interpolation, mean/std,
fill); `prepare_pil` reproduces its geometry exactly on a PIL image (tests compare it with
open_clip's own transform), and `clipdedup.ingest.decode.dali` builds the same steps as a DALI graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_MODES = ("shortest", "longest", "squash")
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PrepSpec:
    """open_clip's inference preprocessing, as data.

    Attributes:
        size: (height, width) of the model input.
        resize_mode: 'shortest' (resize the shorter side, centre crop), 'longest' (fit inside, pad
            with `fill`), 'squash' (resize both sides, aspect ratio not kept).
        interpolation: 'bicubic' or 'bilinear' (antialiased when shrinking, as PIL does).
        mean, std: per-channel normalisation of [0, 1] pixels.
        fill: pad value (0..255) for 'longest'.
    """

    size: tuple[int, int]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    fill: int = 0

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PrepSpec:
        """From `open_clip.get_model_preprocess_cfg(model)`, with open_clip's defaults filled in."""
        size = cfg.get("size", 224)
        hw = (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
        mean = cfg.get("mean") or OPENAI_MEAN
        std = cfg.get("std") or OPENAI_STD
        mean = tuple(mean) if isinstance(mean, (tuple, list)) else (mean,) * 3
        std = tuple(std) if isinstance(std, (tuple, list)) else (std,) * 3
        interp = cfg.get("interpolation") or "bicubic"
        mode = cfg.get("resize_mode") or "shortest"
        # open_clip maps anything but 'bilinear' (e.g. 'random') to bicubic at inference, and its
        # non-square 'shortest' resize (ResizeKeepRatio) is built without the interpolation: bicubic.
        if interp != "bilinear" or (mode == "shortest" and hw[0] != hw[1]):
            interp = "bicubic"
        return cls(
            size=hw,
            resize_mode=mode,
            interpolation=interp,
            mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in std),  # type: ignore[arg-type]
            fill=int(cfg.get("fill_color", 0) or 0),
        )

    @property
    def min_side(self) -> int:
        """The shorter side a decoder must deliver for the resize to see enough pixels."""
        return min(self.size)


def resized_size(w: int, h: int, spec: PrepSpec) -> tuple[int, int]:
    """(width, height) after the resize step, rounded exactly as torchvision / open_clip round."""
    th, tw = spec.size
    if spec.resize_mode == "squash":
        return tw, th
    if spec.resize_mode == "shortest" and th == tw:
        # torchvision Resize(int): shorter side to size, longer side truncated.
        if w <= h:
            return th, int(th * h / w)
        return int(tw * w / h), tw
    # open_clip ResizeKeepRatio: one ratio for both sides, each side rounded.
    rh, rw = h / th, w / tw
    ratio = max(rh, rw) if spec.resize_mode == "longest" else min(rh, rw)
    return round(w / ratio), round(h / ratio)


def crop_box(w: int, h: int, spec: PrepSpec) -> tuple[int, int, int, int, int, int]:
    """(pad_left, pad_top, pad_right, pad_bottom, crop_left, crop_top) of torchvision's centre crop.

    The image (`w` x `h`, after resizing) is first padded where it is smaller than the target, then
    cropped at the rounded centre.
    """
    th, tw = spec.size
    pl = (tw - w) // 2 if tw > w else 0
    pt = (th - h) // 2 if th > h else 0
    pr = (tw - w + 1) // 2 if tw > w else 0
    pb = (th - h + 1) // 2 if th > h else 0
    w2, h2 = w + pl + pr, h + pt + pb
    return pl, pt, pr, pb, int(round((w2 - tw) / 2.0)), int(round((h2 - th) / 2.0))


def prepare_pil(img: Image.Image, spec: PrepSpec) -> np.ndarray:
    """Resizes and crops an RGB PIL image as open_clip's transform does.

    Returns:
        (H, W, 3) uint8, H x W = `spec.size`; normalise with `normalize_ref` / the encoder.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    nw, nh = resized_size(w, h, spec)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _PIL_FILTERS[spec.interpolation])
    th, tw = spec.size
    if (nw, nh) == (tw, th):
        return np.asarray(img)
    pl, pt, pr, pb, cl, ct = crop_box(nw, nh, spec)
    # Pad value: 'shortest' pads with 0 (torchvision CenterCrop), 'longest' with the model's fill.
    fill = spec.fill if spec.resize_mode == "longest" else 0
    a = np.asarray(img)
    if pl or pt or pr or pb:
        a = np.pad(a, ((pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    return np.ascontiguousarray(a[ct : ct + th, cl : cl + tw])


def normalize_ref(batch: np.ndarray, spec: PrepSpec) -> np.ndarray:
    """Reference normalisation: (B, H, W, 3) uint8 -> (B, 3, H, W) float32, as ToTensor + Normalize."""
    x = batch.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
    std = np.asarray(spec.std, np.float32)[None, :, None, None]
    return (x - mean) / std
