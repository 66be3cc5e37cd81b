from __future__ import annotations

import html
import io
import json
import math
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.report import ReportColumn, thumbnail_jpeg, write_html_report

COLUMNS = [
    ReportColumn("vessel_density", "Vessel density", "%", digits=3),
    ReportColumn("fov_area", "Field of view", "px²"),
    ReportColumn("predicted_iou", "Predicted IoU", digits=2),
]
# Orders differ on purpose: as strings "11.25" < "11.5" < "9.5", in natural order (digit runs read as numbers, as
# for file names) 9.5 < 11.5 < 11.25; only a numeric sort passes. Names: "fundus_10" < "fundus_2" as strings.
ROWS = [
    {"image": "fundus_1.png", "vessel_density": 9.5, "fov_area": 120000, "predicted_iou": 0.91, "flags": ""},
    {
        "image": "fundus_2.png",
        "vessel_density": math.nan,
        "fov_area": 98000,
        "predicted_iou": 0.41,
        "flags": "low predicted quality (IoU 0.41 < 0.6)",
    },
    {"image": "fundus_10.png", "vessel_density": 11.25, "fov_area": 130500, "predicted_iou": 0.88, "flags": ""},
    {"image": "fundus_3.png", "vessel_density": 11.5, "fov_area": 125000, "predicted_iou": 0.79, "flags": ""},
]
SETTINGS = {"checkpoint": "models/sam2_lora.pt", "threshold": 0.5, "restrict_to_fov": True}
FLAG_COLOUR = (255, 217, 204)  # the flagged cell's background in report.py's style sheet
WINDOW = "1400,1100"  # holds the whole results table at one CSS pixel per screen pixel


class ParsedPage(HTMLParser):
    """Every start tag of a page, and the cells (attributes, text) of its results table, row by row."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.headers: list[dict[str, str | None]] = []
        self.rows: list[list[tuple[dict[str, str | None], str]]] = []
        self._table: str | None = None
        self._section = ""
        self._cell: tuple[dict[str, str | None], list[str]] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "table":
            self._table = attributes.get("id")
        elif self._table != "results":
            return
        elif tag in ("thead", "tbody"):
            self._section = tag
        elif tag == "tr" and self._section == "tbody":
            self.rows.append([])
        elif tag == "th" and self._section == "thead":
            self.headers.append(attributes)
        elif tag == "td":
            self._cell = (attributes, [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)

    def names(self) -> list[str]:
        return [row[0][1] for row in self.rows]


def fundus_overlay(vessel_colour: tuple[int, int, int], height: int = 384, width: int = 512) -> np.ndarray:
    """A dark-red fundus disc on black with vessel-like bands, 8 px thick, painted in ``vessel_colour``."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    rows, cols = np.mgrid[:height, :width]
    disc = (rows - height / 2) ** 2 + (cols - width / 2) ** 2 < (0.45 * height) ** 2
    image[disc] = (150, 40, 25)
    vessels = np.zeros_like(disc)
    for row in (100, 180, 260):
        vessels[row : row + 8] = True
    vessels[:, 250:258] = True
    image[disc & vessels] = vessel_colour
    return image


def overlay_thumbnails() -> dict[str, bytes]:
    """Thumbnails embedded for two of the four rows (fundus_10.png's overlay is shown from its file, fundus_3.png has
    none, so the browser shows a "no picture" cell too)."""
    return {
        "fundus_1.png": thumbnail_jpeg(fundus_overlay((0, 255, 0))),
        # as float [0, 1], the other input thumbnail_jpeg takes
        "fundus_2.png": thumbnail_jpeg(fundus_overlay((255, 0, 255)).astype(np.float32) / 255),
    }


# fundus_10.png's overlay, beside the report under a name an address must escape (a space, "#", "%")
LINKED = {"fundus_10.png": "overlays of #10 at 100%/fundus_10_overlay.png"}


def count(pixels: np.ndarray, colour: str) -> int:
    """How many pixels of an (H, W, 3) uint8 picture are "green" or "magenta"-ish, or the "flag" colour."""
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    if colour == "green":
        return int(np.count_nonzero((green >= 200) & (red <= 80) & (blue <= 80)))
    if colour == "magenta":
        return int(np.count_nonzero((red >= 200) & (green <= 80) & (blue >= 200)))
    return int(np.count_nonzero(np.all(np.abs(pixels.astype(np.int16) - FLAG_COLOUR) <= 4, axis=-1)))


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, which the browser tests drive headless."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    if path is None:
        pytest.skip("Chromium not installed: run tests/install_chromium.sh")
    return path


# Clicks headers the way a reader would, recording the row order after each click into the page for --dump-dom.
CLICKS = """<script>
const names = () => Array.from(document.querySelectorAll("#results tbody tr"), row => row.cells[0].textContent);
const header = key => document.querySelector(`#results th[data-key="${key}"]`);
const seen = [];
for (const key of ["image", "vessel_density", "vessel_density"]) { header(key).click(); seen.push(names()); }
seen.push(location.hash);
const record = document.createElement("pre");
record.id = "clicks";
record.textContent = JSON.stringify(seen);
document.body.appendChild(record);
</script></body>"""


def render(chromium: str, address: str, folder: Path) -> tuple[np.ndarray, str]:
    """Open a page in headless Chromium (fresh profile); return its screenshot and its DOM once scripts ran."""
    picture = folder / "screenshot.png"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # without these Chromium phones home at start, and this machine's closed network refuses it
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-profile-', dir=folder)}",
        "--virtual-time-budget=2000",
        "--dump-dom",
        f"--screenshot={picture}",
        f"--window-size={WINDOW}",
        address,
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-2000:]}"
    return np.asarray(Image.open(picture).convert("RGB")), result.stdout


@pytest.fixture(scope="module")
def rendered(chromium, module_folder) -> dict[str, tuple[np.ndarray, str]]:
    """Two reports as Chromium shows them (screenshot, DOM); one browser run each, as its start takes seconds.

    ``"overlays"``: the report with its thumbnails and its linked overlay, opened at ``#sort=vessel_density:desc``.
    ``"blank"``: the same report without thumbnails, with :data:`CLICKS` added.
    """
    folder = module_folder("rendered")
    overlays = write_html_report(
        folder / "overlays" / "report.html", ROWS, COLUMNS, overlay_thumbnails(), SETTINGS, linked=LINKED
    )
    linked_file = overlays.parent / LINKED["fundus_10.png"]
    linked_file.parent.mkdir()
    Image.fromarray(fundus_overlay((0, 255, 0))).save(linked_file)
    blank = write_html_report(folder / "blank" / "report.html", ROWS, COLUMNS, {}, SETTINGS)
    blank.write_text(blank.read_text(encoding="utf-8").replace("</body>", CLICKS), encoding="utf-8")
    return {
        "overlays": render(chromium, overlays.as_uri() + "#sort=vessel_density:desc", overlays.parent),
        "blank": render(chromium, blank.as_uri(), blank.parent),
    }


def test_the_browser_renders_the_embedded_and_the_linked_overlays(rendered):
    thumbnails = overlay_thumbnails()
    decoded = {name: np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")) for name, jpeg in thumbnails.items()}
    green_embedded, magenta_embedded = count(decoded["fundus_1.png"], "green"), count(decoded["fundus_2.png"], "magenta")
    assert green_embedded > 2500 and magenta_embedded > 2500, "the vessels survive downscaling and JPEG"

    shown, _ = rendered["overlays"]
    # The linked overlay is drawn at the thumbnails' size too: as much green as the embedded one, twice in all.
    assert count(shown, "green") >= 1.8 * green_embedded, "the embedded and the linked green overlays are drawn"
    assert count(shown, "magenta") >= 0.9 * magenta_embedded, "the magenta overlay is drawn"
    assert count(shown, "flag") > 500, "the flagged row's flag cell is coloured"
    blank, _ = rendered["blank"]
    assert count(blank, "green") == 0 and count(blank, "magenta") == 0, "the page itself has no overlay colours"
    assert count(blank, "flag") > 500


def test_a_sort_requested_in_the_address_is_applied_at_load(rendered):
    page = ParsedPage(rendered["overlays"][1])
    assert page.names() == ["fundus_3.png", "fundus_10.png", "fundus_1.png", "fundus_2.png"], "numeric, descending"
    assert [header.get("aria-sort") for header in page.headers if header.get("data-key") == "vessel_density"] == [
        "descending"
    ]


def test_clicking_headers_sorts_ascending_then_descending(rendered):
    dom = rendered["blank"][1]
    record = re.search(r'<pre id="clicks">(.*?)</pre>', dom)
    assert record, f"the click script did not run:\n{dom[-2000:]}"
    by_name, ascending, descending, address = json.loads(html.unescape(record.group(1)))
    assert by_name == ["fundus_1.png", "fundus_2.png", "fundus_3.png", "fundus_10.png"], "numbers in names as numbers"
    assert ascending == ["fundus_1.png", "fundus_10.png", "fundus_3.png", "fundus_2.png"], "numeric, NaN last"
    assert descending == ["fundus_3.png", "fundus_10.png", "fundus_1.png", "fundus_2.png"], "second click: descending"
    assert address == "#sort=vessel_density:desc", "the address links to the sorted report"


def test_hostile_text_is_escaped_and_the_page_is_self_contained(tmp_path):
    hostile = "<script>alert(1)</script>.png"
    attribute = '"><img src=x onerror=alert(2)>'
    rows = [
        {
            "image": hostile,
            "vessel_density": math.nan,
            "fov_area": None,
            "predicted_iou": attribute,
            "flags": f"odd name {attribute}",
        },
        {"image": "plain.png", "vessel_density": 12.0, "fov_area": 1000, "predicted_iou": 0.5, "flags": ""},
    ]
    columns = [*COLUMNS, ReportColumn(attribute, attribute, unit=attribute)]
    thumbnails = {hostile: thumbnail_jpeg(fundus_overlay((0, 255, 0)))}
    settings = {attribute: hostile, "output": "</table><script>alert(3)</script>"}
    report = write_html_report(tmp_path / "out" / "report.html", rows, columns, thumbnails, settings, title=hostile)

    text = report.read_text(encoding="utf-8")
    page = ParsedPage(text)
    assert [tag for tag, _ in page.tags].count("script") == 1, "only the report's own script"
    assert {tag for tag, _ in page.tags} <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "p",
        "span",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "img",
        "script",
    }
    assert not [name for _, attributes in page.tags for name in attributes if name.startswith("on")]
    linking = [(tag, attributes) for tag, attributes in page.tags if "src" in attributes or "href" in attributes]
    assert [tag for tag, _ in linking] == ["img"], "nothing but the one thumbnail refers to anything"
    assert linking[0][1]["src"].startswith("data:image/jpeg;base64,"), "embedded, not fetched"
    assert "http://" not in text and "https://" not in text and "<link" not in text
    assert page.names() == [hostile, "plain.png"], "the hostile name is shown as text"
    assert f"<h1>{html.escape(hostile)}</h1>" in text

    hostile_row, plain_row = page.rows
    assert hostile_row[2:4] == [({"class": "number missing", "data-value": ""}, "n/a")] * 2
    assert hostile_row[4][1] == attribute and hostile_row[-1][1] == f"odd name {attribute}"
    assert plain_row[1] == ({"class": "thumb missing"}, "no picture"), "an image without a thumbnail"
    assert plain_row[2] == ({"class": "number", "data-value": "12.0"}, "12"), "a whole number shows whole"
    assert '<span id="flagged-count">1 flagged</span>' in text
    assert [attributes.get("class") for tag, attributes in page.tags if tag == "tr"].count("flagged") == 1

    write_html_report(report, rows[1:], columns, thumbnails, settings)
    assert [path.name for path in report.parent.iterdir()] == ["report.html"], "no temporary file is left behind"
    assert '<span id="flagged-count">0 flagged</span>' in report.read_text(encoding="utf-8"), "replaced"


def test_overlays_not_embedded_are_shown_lazily_from_their_escaped_file_address(tmp_path):
    rows = [{"image": name, "flags": ""} for name in ("embedded.png", "linked.png", "hostile.png", "none.png")]
    thumbnails = {"embedded.png": thumbnail_jpeg(fundus_overlay((0, 255, 0)))}
    linked = {
        "embedded.png": "embedded_overlay.png",  # an embedded thumbnail wins over its file
        "linked.png": "sub folder/linked_overlay.png",
        "hostile.png": '" onerror="alert(1)&#.png',
    }
    text = write_html_report(tmp_path / "report.html", rows, [], thumbnails, {}, linked=linked).read_text("utf-8")
    page = ParsedPage(text)

    images = [attributes for tag, attributes in page.tags if tag == "img"]
    assert images[0]["src"].startswith("data:image/jpeg;base64,") and "loading" not in images[0]
    assert [(image["src"], image["loading"]) for image in images[1:]] == [
        ("sub%20folder/linked_overlay.png", "lazy"),
        ("%22%20onerror%3D%22alert%281%29%26%23.png", "lazy"),
    ]
    assert not [name for _, attributes in page.tags for name in attributes if name.startswith("on")]
    assert page.rows[3][1] == ({"class": "thumb missing"}, "no picture")
    assert "The overlays of 2 of them are shown from their files in this page's folder" in text


def test_thumbnails_keep_the_aspect_ratio_within_the_maximum_side():
    def size(png: bytes) -> tuple[int, int]:
        return Image.open(io.BytesIO(png)).size

    assert size(thumbnail_jpeg(np.zeros((600, 1000, 3), dtype=np.uint8))) == (256, 154)
    assert size(thumbnail_jpeg(np.zeros((1000, 300), dtype=np.float32), max_side=100)) == (30, 100)
    assert size(thumbnail_jpeg(np.zeros((40, 60, 3), dtype=np.uint8))) == (60, 40), "never enlarged"
    green = Image.open(io.BytesIO(thumbnail_jpeg(np.full((512, 512, 3), (0.0, 1.0, 0.0)))))
    assert green.format == "JPEG"
    green_error = np.abs(np.asarray(green).astype(int) - (0, 255, 0)).max()
    assert np.asarray(green).shape == (256, 256, 3) and green_error <= 2, "float [0, 1] becomes uint8 0-255 (JPEG: ±2)"
    with pytest.raises(ValueError, match="shape"):
        thumbnail_jpeg(np.zeros((10, 10, 4), dtype=np.uint8))


def test_numbers_show_their_significant_digits_and_counts_show_whole(tmp_path):
    columns = [ReportColumn("calibre_mean_mm", "Calibre", "mm"), ReportColumn("segments", "Segments")]
    rows = [{"image": "eye.png", "calibre_mean_mm": 0.030349, "segments": 387.0, "flags": ""}]
    page = ParsedPage(write_html_report(tmp_path / "report.html", rows, columns, {}, {}).read_text(encoding="utf-8"))
    (row,) = page.rows
    assert row[2] == ({"class": "number", "data-value": "0.030349"}, "0.03035"), "not 0.030 at 3 decimals"
    assert row[3] == ({"class": "number", "data-value": "387.0"}, "387"), "not 387.000"


def test_a_dataset_mean_written_as_null_is_charted_as_undefined(tmp_path, monkeypatch):
    """metrics_summary.json writes an undefined mean (NaN: cup sensitivity when no cup is labelled) as null."""
    from scripts.handlers import EvaluationChart

    summary = tmp_path / "metrics_summary.json"
    metrics = {"disc/fov/sensitivity": {"mean": 0.81}, "cup/fov/sensitivity": {"mean": None}}
    summary.write_text(json.dumps({"summary": {"datasets": {"DRIVE": {"images": 3, "metrics": metrics}}}}))
    drawn = []
    monkeypatch.setattr("scripts.plots.plt.close", drawn.append)  # keep the figure to read its bars' labels
    EvaluationChart(summary, tmp_path / "chart.png")(None)
    assert Image.open(tmp_path / "chart.png").size[0] > 0
    (figure,) = drawn
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert sorted(labels) == ["0.810", "n/a"], labels


def test_a_chart_that_cannot_be_written_leaves_no_figure_open(tmp_path):
    import matplotlib.pyplot as plt

    from scripts.atomic import OutputError
    from scripts.plots import plot_dataset_metrics

    (tmp_path / "chart.png").mkdir()  # a folder where the chart should go
    open_before = plt.get_fignums()
    with pytest.raises(OutputError, match="chart.png"):
        plot_dataset_metrics({"DRIVE": {"dice": 0.8}}, tmp_path / "chart.png", "means")
    assert plt.get_fignums() == open_before
