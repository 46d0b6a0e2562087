"""The review report's HTML contact sheet and its thumbnail cache.

One static page, index.html, with no external resources and no server (it works from file://): the
groups' data sits in the page as JSON, and its script (page.js, inlined) renders PER_PAGE
groups at a time, with filters, and keeps the user's decisions (kept file, "do not move", skipped
group) in localStorage under the report's id, exported as decisions.json for `apply`. Thumbnails sit
in DIR/thumbs/, named by a hash of (path, mtime, size), so a file that changes gets a new thumbnail
and an unchanged one is never decoded twice; the page loads them lazily. Every name reaches the page
as text (textContent), never as markup. Thumbnails that fail to load are marked, logged to the
console and counted in <body data-broken>, so a broken page is detectable by a headless browser.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from clipdedup.ingest.decode.base import DecodeError, decode_pil
from clipdedup.util.fsutil import atomic_file

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


def _e(text: Any) -> str:
    return html.escape(shown(text) if isinstance(text, str) else str(text), quote=True)


PER_PAGE = 50  # groups rendered at a time; the page holds every group's data, the DOM only these
ASSETS = Path(__file__).parent
BROWSER_KEYS = (
    "keys: j/k next/previous group, h/l previous/next file, x or Enter keep this file, 1-9 keep file N, "
    "m do not move, s skip group, u reset group, n/p next/previous page"
)


def _member(m: Any, thumb: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"p": m.path, "t": thumb, "z": m.size, "n": m.nearest}
    if shown(m.path) != m.path:
        d["s"] = shown(m.path)  # what the page prints for a name that is not UTF-8
    if m.exact_of:
        d["x"] = shown(m.exact_of)
    if m.dest:
        d["dest"] = shown(m.dest)
    if m.base:
        d["b"] = True
    if m.status.startswith("stays: "):
        d["note"] = m.status
    d["u"] = "file://" + quote(os.fsencode(os.path.abspath(m.file)))  # any bytes, no symlink lookups
    return d


def _pair(
    index: dict[str, int], a: str, b: str, d: float, scores: dict[tuple[str, str], float] | None
) -> list[Any]:
    out: list[Any] = [index[a], index[b], d]
    if scores is not None and (a, b) in scores:
        out.append(scores[(a, b)])
    return out


def _rejected_html(head: dict[str, Any]) -> str:
    """The screened candidates that verification turned down, as a static table above the groups."""
    v = head.get("verification")
    if not v:
        return ""
    rows = "".join(
        f"<tr><td>{_e(c['a'])}</td><td>{_e(c['b'])}</td><td>{c['distance']:.6f}</td><td>{c['score']:.4f}</td></tr>"
        for c in v["rejected"]
    )
    return (
        f"<details><summary>{v['candidates']} candidates within the screening threshold, {v['confirmed']} "
        f"confirmed by the {_e(v['measure'])} (check score >= {v['min_score']:g}); {len(v['rejected'])} "
        "turned down</summary><table><tr><th>a</th><th>b</th><th>distance</th><th>check score</th></tr>"
        f"{rows}</table></details>"
    )


def page_data(
    groups: Sequence[Any],
    head: dict[str, Any],
    thumbs: dict[str, str | None],
    scores: dict[tuple[str, str], float] | None = None,
) -> dict[str, Any]:
    """Everything the page's script renders: the groups with their members, and the report's id.
    With `scores` (a verified model), each pair carries its check score as a fourth element."""

    out = []
    for g in groups:
        ds = [d for _, _, d in g.pairs]
        index = {m.path: k for k, m in enumerate(g.members)}
        out.append(
            {
                "id": g.id,
                "kept": g.kept,
                "why": g.why,
                "exact": g.exact,
                "dmax": max(ds) if ds else 0.0,
                "pairs": [_pair(index, a, b, d, scores) for a, b, d in g.pairs],  # members by index
                "members": [_member(m, thumbs.get(m.file)) for m in g.members],
                "stayed": [{"p": shown(st["path"]), "why": shown(st["reason"])} for st in g.stayed],
            }
        )
    moved = any(m.status == "moved" for g in groups for m in g.members)
    return {
        "report_id": head.get("report_id"),
        "image_dir": head.get("roots", {}).get(""),
        "applicable": not moved,
        "per_page": PER_PAGE,
        "groups": out,
    }


def _json_in_script(doc: dict[str, Any]) -> str:
    """JSON that cannot end its <script> element: every '<' (only ever inside strings) is escaped."""
    return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).replace("<", "\\u003c")


def write_html(
    groups: Sequence[Any],
    head: dict[str, Any],
    out_dir: str,
    *,
    thumb_size: int = 256,
    scores: dict[tuple[str, str], float] | None = None,
) -> list[str]:
    """Writes index.html (every group, decisions on the page); returns its file name in a list.
    `scores`: check scores of a verified model's pairs (shown beside each distance)."""
    items = sorted({(m.source, m.file, m.mtime_ns, m.size) for g in groups for m in g.members})
    thumbs = dict(zip([t[1] for t in items], ensure_thumbs(items, out_dir, thumb_size)))
    mode = "dry run: nothing was moved" if head.get("dry_run") else "files were moved as shown"
    summary = (
        f"{len(groups)} groups ({head.get('exact_groups', 0)} of exact copies), threshold "
        f"{head.get('threshold')}, model {head.get('model')}, matcher {head.get('backend')}, keeping logic "
        f"{head.get('keeping_logic')}; {mode}. Generated {head.get('generated')}, report "
        f"{head.get('report_id')}."
    )
    roots = "; ".join(f"{k or 'images'} = {v}" for k, v in head.get("roots", {}).items())
    css = (ASSETS / "page.css").read_text(encoding="utf-8")
    js = (ASSETS / "page.js").read_text(encoding="utf-8")
    data = _json_in_script(page_data(groups, head, thumbs, scores))
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>clip-image-deduper review: {len(groups)} groups</title><style>{css}</style></head><body>"
        f"<header><h1>Duplicate groups for review</h1><p>{_e(summary)}</p><p>{_e(roots)}</p>"
        f"{_rejected_html(head)}</header>"
        '<div id="bar"><span id="decide"><button type="button" id="export">export decisions.json</button> '
        '<label>import <input type="file" id="import" accept=".json,application/json"></label> '
        '<button type="button" id="clear">forget all decisions</button> <span id="count"></span></span>'
        '<label>show <select id="f-decided"><option value="all">all groups</option>'
        '<option value="decided">groups with decisions</option><option value="undecided">groups '
        'without decisions</option></select></label> <label><input type="checkbox" id="f-exact"> exact '
        'copies only</label> <label>farthest pair from <input type="number" id="f-min" step="any" '
        'min="0"> to <input type="number" id="f-max" step="any" min="0"></label> '
        '<button type="button" id="prev">&larr; previous</button> <span id="where"></span> '
        '<button type="button" id="next">next &rarr;</button> <span id="message"></span>'
        f'<span class="keys">{_e(BROWSER_KEYS)}</span></div><main id="groups"></main>'
        f'<script id="clipdedup-data" type="application/json">{data}</script>'
        f"<script>{js}</script></body></html>\n"
    )
    with atomic_file(os.path.join(out_dir, "index.html"), "w", encoding="utf-8") as f:
        f.write(page)
    return ["index.html"]
