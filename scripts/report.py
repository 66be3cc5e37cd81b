"""An HTML report of an inference run: one self-contained page to open from disk and look through the results.

``report.html`` shows, per image, a thumbnail of its overlay, its measurements and its flags, in a table sortable by
any column (click a header: ascending, click again: descending; missing values always last), plus the run's settings.
It opens from disk without a server or internet: CSS and JS are inline, and thumbnails are embedded as base64 JPEG
``data:`` URIs, so a report of a few hundred images can be mailed or archived on its own. Pictures not embedded
(the writer chooses: a run of thousands would make a page no browser opens comfortably) are shown from their files
beside the page, loaded as they scroll into view.

A link to the report sorted by a column: append ``#sort=<key>`` (ascending) or ``#sort=<key>:desc`` to its address,
e.g. ``report.html#sort=vessel_density:desc``; clicking a header updates the address to match.
"""

from __future__ import annotations

import base64
import html
import io
import math
import numbers
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from scripts.atomic import write_text_atomic

__all__ = ["ReportColumn", "thumbnail_jpeg", "write_html_report"]


@dataclass(frozen=True)
class ReportColumn:
    """A measurement column of the report.

    Attributes:
        key: the key of the value in each row.
        title: header text.
        unit: shown in the header, e.g. ``"px²"``; empty for none.
        digits: significant digits shown of a fractional value (whole numbers, such as counts, show whole).
    """

    key: str
    title: str
    unit: str = ""
    digits: int = 4


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; vertical-align: middle; }
#results th[data-key] { cursor: pointer; user-select: none; background: #f0f0f0; }
#results th[aria-sort=ascending]::after { content: " \\25B2"; }
#results th[aria-sort=descending]::after { content: " \\25BC"; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #999; }
td.thumb img { display: block; max-width: 256px; }
tr.flagged td.flag { background: #ffd9cc; color: #8a1c00; font-weight: bold; }
.unit { font-weight: normal; color: #555; }
#flagged-count { font-weight: bold; }
"""

# Missing values (NaN, None, empty) carry data-value="" and sort last in both directions. Array.sort is stable, so
# ties keep their previous order.
_SCRIPT = """
const table = document.getElementById("results");
const headers = Array.from(table.tHead.rows[0].cells);

function sortBy(key, descending) {
  const index = headers.findIndex(header => header.dataset.key === key);
  if (index < 0) return;
  const numeric = headers[index].dataset.type === "number";
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  rows.sort((a, b) => {
    const x = a.cells[index].dataset.value, y = b.cells[index].dataset.value;
    if (x === "" || y === "") return (x === "") - (y === "");
    const order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
    return descending ? -order : order;
  });
  rows.forEach(row => body.appendChild(row));
  headers.forEach(header => header.removeAttribute("aria-sort"));
  headers[index].setAttribute("aria-sort", descending ? "descending" : "ascending");
  history.replaceState(null, "", "#sort=" + encodeURIComponent(key) + (descending ? ":desc" : ""));
}

headers.filter(header => header.dataset.key).forEach(header => header.addEventListener(
  "click", () => sortBy(header.dataset.key, header.getAttribute("aria-sort") === "ascending")));

const requested = /^#sort=(.*?)(?::(asc|desc))?$/.exec(location.hash);
if (requested) sortBy(decodeURIComponent(requested[1]), requested[2] === "desc");
"""


def thumbnail_jpeg(image: np.ndarray, max_side: int = 256, quality: int = 85) -> bytes:
    """A picture downscaled (aspect kept, never enlarged) so its longer side is at most ``max_side``, as JPEG bytes.

    JPEG because a fundus photograph barely compresses as PNG (about 110 KB per 256 px thumbnail); its colour is kept
    at full resolution (no chroma subsampling), which would smear the thin painted vessels.

    Args:
        image: ``(H, W, 3)`` RGB or ``(H, W)`` gray array, uint8 or float in ``[0, 1]`` (clipped to it).
        max_side: the longest side of the thumbnail, in pixels.
        quality: JPEG quality, 1 to 95.

    Returns:
        The JPEG file's bytes.

    Raises:
        ValueError: for another shape, an empty picture or a dtype other than uint8 or float.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3) or 0 in image.shape:
        raise ValueError(f"expected an (H, W) or (H, W, 3) picture, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        image = np.round(np.clip(np.nan_to_num(image), 0.0, 1.0) * 255.0).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or float [0, 1] picture, got dtype {image.dtype}")
    picture = Image.fromarray(np.ascontiguousarray(image))
    scale = max_side / max(picture.size)
    if scale < 1:
        size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
        picture = picture.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def _is_number(value: Any) -> bool:
    # bool is an int to Python but a yes/no to a reader; numpy scalars register as numbers.Real.
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value) or (_is_number(value) and math.isnan(value))


def _is_numeric_column(rows: Sequence[Mapping[str, Any]], key: str) -> bool:
    return all(_is_number(row.get(key)) or _is_missing(row.get(key)) for row in rows)


def _cell(value: Any, numeric: bool, digits: int = 4) -> str:
    """A table cell: the value formatted for reading, and its raw value in ``data-value`` for sorting."""
    if _is_missing(value):
        return f'<td class="{"number missing" if numeric else "missing"}" data-value="">n/a</td>'
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        text = raw = str(int(value))
    elif _is_number(value):
        number = float(value)
        # Counts are floats so that they can be NaN; a calibre of 0.0303 mm needs its digits, not 3 decimals.
        if not math.isfinite(number) or number.is_integer() or abs(number) >= 10 ** (digits - 1):
            text = f"{number:.0f}"  # whole numbers, and the integer part of large ones, in full
        else:
            text = np.format_float_positional(number, digits, False, False, trim="-")
        # repr round-trips every float; JavaScript's Number() reads "Infinity", not Python's "inf".
        raw = repr(float(value)) if math.isfinite(value) else ("Infinity" if value > 0 else "-Infinity")
    else:
        text = raw = str(value)
    css = ' class="number"' if numeric else ""
    return f'<td{css} data-value="{html.escape(raw)}">{html.escape(text)}</td>'


def _header(key: str, title: str, numeric: bool, unit: str = "") -> str:
    unit_html = f' <span class="unit">({html.escape(unit)})</span>' if unit else ""
    kind = "number" if numeric else "text"
    return f'<th data-key="{html.escape(key)}" data-type="{kind}">{html.escape(title)}{unit_html}</th>'


def _thumbnail_cell(name: str, thumbnails: Mapping[str, bytes], linked: Mapping[str, str]) -> str:
    alt = f'alt="overlay of {html.escape(name)}"'
    if thumbnails.get(name):
        data = base64.b64encode(thumbnails[name]).decode("ascii")
        return f'<td class="thumb"><img src="data:image/jpeg;base64,{data}" {alt}></td>'
    if linked.get(name):
        address = html.escape(urllib.parse.quote(linked[name]))
        return f'<td class="thumb"><img src="{address}" loading="lazy" {alt}></td>'
    return '<td class="thumb missing">no picture</td>'


def write_html_report(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[ReportColumn],
    thumbnails: Mapping[str, bytes],
    settings: Mapping[str, Any],
    title: str = "Fundus segmentation report",
    name_key: str = "image",
    flag_key: str = "flags",
    linked: Mapping[str, str] | None = None,
) -> Path:
    """Write the report page: per image its name, overlay thumbnail, measurements and flags, then the settings.

    The table's columns are the image name, the thumbnail, ``columns`` in order, then the flags. A column whose
    values are all numbers (or missing) sorts numerically, any other alphabetically with digit runs compared as
    numbers (``fundus_2.png`` before ``fundus_10.png``). Every text is HTML-escaped.

    Args:
        path: the HTML file to write (atomically); its folder is created.
        rows: one mapping per image, holding ``name_key``, ``flag_key`` and the columns' keys (a missing key or
            None, NaN or "" shows as "n/a").
        columns: the measurement columns to show.
        thumbnails: JPEG bytes (see :func:`thumbnail_jpeg`) by image name, embedded in the page.
        settings: the run's settings, shown as a key/value table.
        title: the page's title and heading.
        name_key: the key of the image's file name in each row, also its key in ``thumbnails``.
        flag_key: the key of the row's flags: "" or None for none, else the reasons as text.
        linked: by image name, the path of a picture relative to the page's folder (``/``-separated), shown from
            that file for an image without an embedded thumbnail. An image with neither shows "no picture".

    Returns:
        The path written.
    """
    linked = linked or {}
    measured = [(column, _is_numeric_column(rows, column.key)) for column in columns]
    headers = [_header(name_key, "Image", False), "<th>Overlay</th>"]
    headers += [_header(column.key, column.title, numeric, column.unit) for column, numeric in measured]
    headers.append(_header(flag_key, "Flags", False))

    body = []
    flagged = from_files = 0
    for row in rows:
        name = str(row.get(name_key, ""))
        flags = str(row.get(flag_key) or "")
        flagged += bool(flags)
        from_files += not thumbnails.get(name) and bool(linked.get(name))
        cells = [_cell(name, False), _thumbnail_cell(name, thumbnails, linked)]
        cells += [_cell(row.get(column.key), numeric, column.digits) for column, numeric in measured]
        cells.append(f'<td class="flag" data-value="{html.escape(flags)}">{html.escape(flags)}</td>')
        body.append(('<tr class="flagged">' if flags else "<tr>") + "".join(cells) + "</tr>")

    body_html = "\n".join(body)
    images = f"{len(rows)} image" + ("" if len(rows) == 1 else "s")
    kept_apart = (
        f" The overlays of {from_files} of them are shown from their files in this page's folder: keep them together."
        if from_files
        else ""
    )
    setting_rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
        for key, value in settings.items()
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>{images}, <span id="flagged-count">{flagged} flagged</span>. Click a column header to sort.{kept_apart}</p>
<table id="results">
<thead><tr>{"".join(headers)}</tr></thead>
<tbody>
{body_html}
</tbody>
</table>
<h2>Settings</h2>
<table id="settings">{setting_rows}</table>
<script>{_SCRIPT}</script>
</body>
</html>
"""
    path = Path(path)
    write_text_atomic(path, page)
    return path
