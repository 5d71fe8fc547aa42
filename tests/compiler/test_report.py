"""The reports: text essentials, and one self-contained HTML page parsed as a browser would."""

from html.parser import HTMLParser
from pathlib import Path

import pytest

from fiddlerc.api import plan as plan_model
from fiddlerc.compiler.report import report_html, report_text, time_split

MIXTRAL = Path(__file__).parents[1] / "data" / "mixtral-8x7b-config.json"
HISTORY = (
    Path(__file__).parents[1] / "data" / "mixtral-8x7b-popularity" / "mixtral_8x7b_instruct-high_school_us_history.json"
)
VOID = {"meta", "br", "img", "hr", "input", "link"}


class Checker(HTMLParser):
    """Tags balanced, no external references, and what the page holds."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.count: dict[str, int] = {}
        self.titles: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.count[tag] = self.count.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href", "xlink:href") or (
                value and ("http:" in value or "https:" in value or "url(" in value)
            ):
                self.errors.append(f"external reference {name}={value!r}")
        if tag in ("script", "link", "iframe", "img", "object"):
            self.errors.append(f"<{tag}> in a self-contained report")
        if tag not in VOID:
            self.stack.append(tag)
        self._in_title = tag == "title"

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()
        self._in_title = False

    def handle_data(self, data):
        if self._in_title and self.stack and self.stack[-1] == "title":
            self.titles.append(data)


@pytest.fixture(scope="module")
def priced():
    return plan_model(MIXTRAL, "24GiB", context=512, hardware="quadro-rtx6000-skylake48", popularity=HISTORY)


def parse(page: str) -> Checker:
    c = Checker()
    c.feed(page)
    c.close()
    assert page.startswith("<!DOCTYPE html>") and not c.errors and not c.stack, (c.errors, c.stack)
    return c


def test_html_report_is_valid_self_contained_and_complete(priced):
    page = report_html(priced)
    c = parse(page)
    # heatmap: one cell per expert, its device and use in the tooltip; plus memory and time bars
    cells = [t for t in c.titles if t.startswith("layer ")]
    assert len(cells) == 256 and "layer 12 expert 1: cuda:0" in " ".join(cells)
    assert c.count["svg"] == 1 + 3 + 1  # memory bar, one bar per resource, the heatmap
    assert c.count["tr"] == 256 + 1  # a decision row per expert and the header
    for words in ("dense weights", "KV-cache reserve", "headroom", "GPU:", "CPU:", "transfers:", "idle",
                  "measured popularity mixtral_8x7b_instruct-high_school_us_history.json"):  # fmt: skip
        assert words in page
    assert report_html(priced) == page  # deterministic


def test_html_escapes_what_the_plan_says(priced):
    from dataclasses import replace

    hostile = priced.with_(
        experts=(replace(priced.experts[0], reason='<script>alert("x")</script>'), *priced.experts[1:])
    )
    page = report_html(hostile)
    parse(page)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_time_split_adds_up_and_the_text_report_shows_it(priced):
    split = time_split(priced)
    pr = priced.prediction
    assert split["GPU"] + split["idle"] == pytest.approx(pr.simulated_ms_per_token, rel=1e-3)
    assert split["CPU"] > split["GPU"]  # about 3/4 of the experts sit on the CPU
    text = report_text(priced)
    assert "placed by measured popularity" in text and "fast device idle" in text
    unpriced = plan_model(MIXTRAL, "24GiB", context=512)
    assert time_split(unpriced) is None and "No prediction" in report_html(unpriced)
    parse(report_html(unpriced))


def test_cli_writes_the_html_report(model_dirs, tmp_path, capsys):
    from fiddlerc.cli import main

    out = tmp_path / "out"
    args = ["compile", str(model_dirs("mixtral")), "-o", str(out), "--gpu-memory", "1MiB", "--context", "64"]
    assert main([*args, "--hardware", "cpu-2core"]) == 0
    assert main(["report", str(out), "--format", "html"]) == 0
    assert (out / "report.html").is_file() and f"wrote {out / 'report.html'}" in capsys.readouterr().out
    assert main(["report", str(out), "--format", "html", "-o", str(tmp_path / "r.html")]) == 0
    parse((tmp_path / "r.html").read_text())
