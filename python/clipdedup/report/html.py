"""The review report's HTML contact sheet and its thumbnail cache.

One static page per GROUPS_PER_PAGE groups (index.html, page-2.html, ...), no external resources:
thumbnails sit in DIR/thumbs/, named by a hash of (path, mtime, size), so a file that changes gets a
new thumbnail and an unchanged one is never decoded twice. Every path and message is HTML-escaped.
A small inline script marks thumbnails that fail to load (and logs them to the console), so a broken
page is visible to a reader and detectable by a headless browser.
"""

from __future__ import annotations

import hashlib
import html
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clipdedup.ingest.decode.base import DecodeError, decode_pil
from clipdedup.util.fsutil import atomic_file

GROUPS_PER_PAGE = 200
THUMB_DIR = "thumbs"


def shown(path: str) -> str:
    """A path as text that always encodes: undecodable bytes of the name become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace") if path else path


def thumb_name(path: str, mtime_ns: int | None, size: int | None) -> str:
    """Cache file name (relative to the report dir) of `path`'s thumbnail at this mtime and size.

    `path` is the file's place in the image dir, also once it was moved to the trash (a move keeps
    mtime and size), so a real run after a dry run reuses the dry run's thumbnails.
    """
    key = hashlib.sha256(os.fsencode(path) + f"\0{mtime_ns}\0{size}".encode()).hexdigest()[:32]
    return f"{THUMB_DIR}/{key[:2]}/{key}.jpg"


def make_thumb(path: str, dest: str, size: int) -> bool:
    """Writes a JPEG thumbnail (longest side `size`) of `path` to `dest`; False if not an image."""
    try:
        im = decode_pil(path, size)
    except DecodeError:
        return False
    im.thumbnail((size, size))
    with atomic_file(dest) as f:  # a half-written thumbnail is never taken for a cached one
        im.save(f, "JPEG", quality=82)
    return True


def ensure_thumbs(
    items: Sequence[tuple[str, str, int | None, int | None]], out_dir: str, size: int
) -> list[str | None]:
    """Thumbnail path (relative to out_dir) per (source, current file, mtime_ns, size) item, None where
    none can be made."""
    names = [thumb_name(src, m, s) for src, _, m, s in items]

    def one(k: int) -> str | None:
        dest = os.path.join(out_dir, names[k])
        if os.path.exists(dest):
            return names[k]
        return names[k] if make_thumb(items[k][1], dest, size) else None

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(one, range(len(items))))


STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#f6f6f4;color:#222}
header p{margin:.2em 0;color:#555} nav a{margin-right:.6em}
section.group{background:#fff;border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em 1em}
section.group h2{font-size:1.05em;margin:.2em 0 .5em}
.exact{background:#2a6;color:#fff;border-radius:3px;padding:0 .4em;font-size:.85em}
.members{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;width:260px;border:3px solid #ccc;border-radius:4px;padding:4px;background:#fafafa}
figure.kept{border-color:#2a6} figure.moving{border-color:#c33}
figure img{display:block;max-width:256px;max-height:256px;margin:auto}
figure img.broken{outline:3px dashed #c33}
.noprev{height:120px;display:flex;align-items:center;justify-content:center;color:#888}
figcaption{font-size:.8em;word-break:break-all;margin-top:.3em}
.badge{font-weight:bold} figure.kept .badge{color:#2a6} figure.moving .badge{color:#c33}
.why{font-size:.85em;color:#444} table{font-size:.8em;border-collapse:collapse}
td,th{padding:1px 6px;border-bottom:1px solid #eee;text-align:left}
"""

# Marks thumbnails that fail to load; the count ends up in <body data-broken>.
SCRIPT = """
var clipdedupBroken = 0;
document.addEventListener("error", function (e) {
  var t = e.target;
  if (t && t.tagName === "IMG") {
    clipdedupBroken++; t.classList.add("broken");
    console.error("thumbnail failed to load: " + t.getAttribute("src"));
  }
}, true);
window.addEventListener("load", function () {
  document.body.setAttribute("data-broken", String(clipdedupBroken));
});
"""


def _e(text: Any) -> str:
    return html.escape(shown(text) if isinstance(text, str) else str(text), quote=True)


def _dist(d: float | None) -> str:
    return "–" if d is None else f"{d:.4f}"


def _member_html(m: Any, thumb: str | None) -> str:
    cls = "kept" if m.kept else ("moving" if m.dest else "other")
    img = f'<img src="{_e(thumb)}" alt="{_e(m.path)}">' if thumb else '<div class="noprev">no preview</div>'
    try:
        uri = Path(m.file).resolve().as_uri()
        img = f'<a href="{_e(uri)}">{img}</a>'
    except ValueError:
        pass
    lines = [f'<span class="badge">{_e(m.status.upper() if m.kept else m.status)}</span>', _e(m.path)]
    if m.dest:
        lines.append("&rarr; " + _e(m.dest))
    facts = [f"{m.size:,} bytes" if m.size is not None else "size unknown"]
    if not m.kept:
        facts.append(f"to kept {_dist(m.to_kept)}")
    facts.append(f"nearest {_dist(m.nearest)}")
    lines.append(_e(", ".join(facts)))
    if m.exact_of:
        lines.append("byte-identical to " + _e(m.exact_of))
    return f'<figure class="{cls}">{img}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


def _group_html(g: Any, thumbs: dict[str, str | None]) -> str:
    tag = ' <span class="exact">exact copies</span>' if g.exact else ""
    title = f"Group {g.id} &middot; {len(g.members)} files{tag}"
    figs = "".join(_member_html(m, thumbs.get(m.file)) for m in g.members)
    rows = "".join(f"<tr><td>{_e(a)}</td><td>{_e(b)}</td><td>{d:.6f}</td></tr>" for a, b, d in g.pairs)
    pairs = (
        f"<details><summary>{len(g.pairs)} pairs within the threshold</summary>"
        f"<table><tr><th>a</th><th>b</th><th>distance</th></tr>{rows}</table></details>"
    )
    return (
        f'<section class="group" id="g{g.id}" data-group="{g.id}"><h2>{title}</h2>'
        f'<div class="members">{figs}</div><p class="why">kept: {_e(g.why)}</p>{pairs}</section>'
    )


def page_name(k: int) -> str:
    return "index.html" if k == 0 else f"page-{k + 1}.html"


def write_html(
    groups: Sequence[Any], head: dict[str, Any], out_dir: str, *, thumb_size: int = 256
) -> list[str]:
    """Writes the contact sheet pages; returns their file names."""
    items = sorted({(m.source, m.file, m.mtime_ns, m.size) for g in groups for m in g.members})
    thumbs = dict(zip([t[1] for t in items], ensure_thumbs(items, out_dir, thumb_size)))
    n_pages = max(1, -(-len(groups) // GROUPS_PER_PAGE))
    mode = "dry run: nothing was moved" if head.get("dry_run") else "files were moved as shown"
    summary = (
        f"{len(groups)} groups ({head.get('exact_groups', 0)} of exact copies), threshold "
        f"{head.get('threshold')}, model {head.get('model')}, matcher {head.get('backend')}, keeping logic "
        f"{head.get('keeping_logic')}; {mode}. Generated {head.get('generated')}."
    )
    roots = "; ".join(f"{k or 'images'} = {v}" for k, v in head.get("roots", {}).items())
    nav = " ".join(f'<a href="{page_name(k)}">{k + 1}</a>' if n_pages > 1 else "" for k in range(n_pages))
    names = []
    for k in range(n_pages):
        chunk = groups[k * GROUPS_PER_PAGE : (k + 1) * GROUPS_PER_PAGE]
        body = "".join(_group_html(g, thumbs) for g in chunk) or "<p>No duplicate groups.</p>"
        page = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>clip-image-deduper review: {len(groups)} groups (page {k + 1}/{n_pages})</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><header>"
            f"<h1>Duplicate groups for review</h1><p>{_e(summary)}</p><p>{_e(roots)}</p>"
            f"<nav>{nav}</nav></header><main>{body}</main></body></html>\n"
        )
        name = page_name(k)
        with atomic_file(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(page)
        names.append(name)
    return names
