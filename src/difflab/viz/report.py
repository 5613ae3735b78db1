"""Self-contained HTML reports: text, tables and images embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.io import atomic_write_bytes

_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{border-bottom:2px solid #444}h2{margin-top:1.8em;border-bottom:1px solid #ccc}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figcaption{font-size:.85em;color:#555;max-width:420px}img{image-rendering:pixelated;
border:1px solid #ddd}table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;
padding:.25em .6em;text-align:right}th{background:#f3f3f3}.note{color:#555}"""


class Report:
    """Build a report section by section, then ``save(path)`` writes one HTML file."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, *, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, rows: list[dict[str, object]], *, caption: str | None = None) -> None:
        if not rows:
            return
        cols = list(rows[0])
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols)
                       + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")

    def image(self, image: str | Path | np.ndarray, caption: str = "",
              width: int | None = None) -> None:
        """Embed a PNG file or an (H, W, C) uint8 array."""
        if isinstance(image, np.ndarray):
            buf = io.BytesIO()
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, "PNG")
            data = buf.getvalue()
        else:
            data = Path(image).read_bytes()
        b64 = base64.b64encode(data).decode()
        w = f' width="{width}"' if width else ""
        self.parts.append(f'<figure><img src="data:image/png;base64,{b64}"{w} alt="'
                          f'{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                          f"</figcaption></figure>")

    def render(self) -> str:
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>"
                f"{html.escape(self.title)}</title><style>{_CSS}</style></head><body>"
                f"<h1>{html.escape(self.title)}</h1>{''.join(self.parts)}</body></html>\n")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, self.render().encode())
        return path


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
