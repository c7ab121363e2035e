"""The interactive pages in a real browser: headless Chromium driven by Playwright.

Debian's ``chromium`` (``make browser`` installs it; CI runs it) is launched with
``executable_path``: ``playwright install`` would download its own browser from a host this
network cannot reach. Each page opens from ``file://``; the tests watch the console and every
request, read the numbers the page shows, press its buttons and keys, and write a screenshot of
each page into the test's temporary folder for a reviewer.
"""

import json
import os
import re
from pathlib import Path

import pytest

from jaxbp.trace import trace
from jaxbp.trace.html import trace_html
from jaxbp.trace.layer_traces import trace_example

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium phones home at start-up, and on a closed
# network those refused connections show up as errors.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SITE = Path(__file__).resolve().parent.parent / "site"
# starting the browser and compiling each trace: about 20 s for the module
pytestmark = pytest.mark.slow

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'"
)
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        f"no {CHROMIUM}: install it with `make browser` (apt-get install chromium, as root)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


_TRACES = {
    "seed": lambda: trace(),
    "seed_steps": lambda: trace(steps=5),
    **{kind: (lambda kind=kind: trace_example(kind)) for kind in ("conv", "attention", "gru")},
}


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """``pages[name]``: ``(trace, path of its page)`` for the seed (also with --steps) and each
    example, written on first use."""
    folder = tmp_path_factory.mktemp("pages")

    class Pages(dict):
        def __missing__(self, name):
            traced = _TRACES[name]()
            path = folder / f"{name}.html"
            path.write_text(trace_html(traced), encoding="utf-8")
            self[name] = (traced, path)
            return self[name]

    return Pages()


class Opened:
    """A page opened from ``file://`` with its console errors and outside requests recorded."""

    def __init__(self, browser, url: str, width: int = 1200):
        self.page = browser.new_page(viewport={"width": width, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page.on(
            "console",
            lambda m: self.errors.append(m.text) if m.type in ("error", "warning") else None,
        )
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on(
            "request",
            lambda r: (
                None if r.url.startswith(("file://", "data:")) else self.requests.append(r.url)
            ),
        )
        self.page.goto(url)

    def check_clean(self):
        assert self.errors == [] and self.requests == []

    def values(self, node: str) -> list[float]:
        """The exact values of the picture's elements standing for ``node``."""
        return [
            float(v)
            for v in self.page.eval_on_selector_all(
                f'[data-node~="{node}"][data-value]',
                "els => els.map(e => e.getAttribute('data-value'))",
            )
        ]

    def focused(self) -> list[str]:
        return self.page.eval_on_selector_all(
            ".node.focus, .edge.focus", "els => els.map(e => e.getAttribute('data-node'))"
        )

    def step(self) -> int:
        return int(self.page.get_attribute("body", "data-step"))


@pytest.mark.parametrize("name", ["seed", "seed_steps", "conv", "attention", "gru"])
def test_page_opens_cleanly_and_shows_the_json_numbers(browser, pages, name, tmp_path):
    traced, path = pages[name]
    opened = Opened(browser, path.as_uri())
    data = json.loads(traced.render("json"))
    if name.startswith("seed"):
        for k, layer in enumerate(data["layers"]):
            for j, out in enumerate(layer["out"]):
                assert opened.values(traced.names.neuron(k, j)) == [out]
        assert opened.values("E") == [data["loss"]]
        shown = opened.page.text_content("#loss-before")
        assert shown == "0.3540"
    elif name == "conv":
        assert [opened.values(f"y{o + 1}") for o in (0, 1)] == [
            [y[0]] for y in data["forward"]["y"]
        ]
    elif name == "attention":
        p = data["forward"]["p"]
        assert opened.values("p3.2") == [p[2][1]] and opened.values("p1.2") == []  # masked
        assert opened.page.text_content('[data-node="p1.2"] .val') == "masked"
    else:
        assert opened.values("h3.1")[0] == data["forward"]["h"][2][0]
    opened.page.keyboard.press("End")
    opened.page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    opened.check_clean()


def test_seed_stepping_with_buttons_and_keys(browser, pages):
    traced, path = pages["seed"]
    opened = Opened(browser, path.as_uri())
    page = opened.page
    steps = json.loads(page.text_content("#page-data"))["steps"]
    assert opened.step() == 0 and page.text_content("#step-line") == steps[0]["line"]
    assert opened.focused() == ["h1"]  # in_h1 = W1*i1 + W2*i2 + b1*1
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert opened.step() == 2 and page.text_content("#step-line") == steps[2]["line"]
    page.click("#prev")
    assert opened.step() == 1
    page.click("#next")
    page.keyboard.press("ArrowLeft")
    assert opened.step() == 1 and page.text_content("#step-line") == steps[1]["line"]
    # the gradient of W7: its factors, the manual value, jax.grad's, and their agreement
    w7 = next(i for i, s in enumerate(steps) if s["lhs"] == "dE/dW7")
    page.fill("#slider", str(w7))
    page.dispatch_event("#slider", "input")
    assert opened.step() == w7 and opened.focused() == ["W7"]
    factors = page.inner_text("#factor-table")
    assert "dE/dout_o1\t0.8201" in factors and "0.1343" in factors and "0.5812" in factors
    assert "0.0640112915" in page.inner_text("#check-table")
    assert page.text_content("#verdict") == "\u2713 agree"
    assert "printed dE/dW7 = 0.0745" in page.text_content("#step-erratum")
    # the last step: the update, the loss before and after
    page.click("#last")
    assert opened.step() == len(steps) - 1
    update = page.text_content("#update-loss")
    assert "0.3540" in update and steps[-1]["update"]["after_text"] in update
    assert "W7_new" in page.text_content("#step-line")
    assert page.is_disabled("#next") and page.is_disabled("#last")
    focus_at_end = set(opened.focused())
    assert {"W1", "W7", "b2"} <= focus_at_end
    page.keyboard.press("Home")
    assert opened.step() == 0 and page.is_disabled("#prev")
    opened.check_clean()


def test_seed_errata_and_training_slider(browser, pages):
    opened = Opened(browser, pages["seed"][1].as_uri())
    errata = opened.page.inner_text("#errata")
    for printed in ("1.3450", "0.7927", "0.2985", "0.3226", "0.0745", "0.5628"):
        assert printed in errata
    assert re.search(r"E_total\s+0\.3226\s+0\.3540", errata)
    opened.check_clean()
    traced, path = pages["seed_steps"]
    opened = Opened(browser, path.as_uri())
    opened.page.fill("#train-slider", "5")
    opened.page.dispatch_event("#train-slider", "input")
    training = json.loads(opened.page.text_content("#page-data"))["training"]
    assert training["history"] == [float(v) for v in traced.history]
    shown = opened.page.text_content("#train-out")
    assert shown == f"after step 5: E_total = {training['history_text'][5]}"
    assert float(opened.page.get_attribute("#curve-dot", "cx")) == pytest.approx(390)
    opened.check_clean()


def test_pages_read_at_a_phones_width(browser, pages, tmp_path):
    opened = Opened(browser, pages["attention"][1].as_uri(), width=390)
    scroll = opened.page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= 390  # no sideways scrolling of the page itself
    opened.page.keyboard.press("ArrowRight")
    assert opened.step() == 1
    opened.page.screenshot(path=str(tmp_path / "attention_phone.png"), full_page=True)
    opened.check_clean()


@pytest.mark.skipif(
    not (SITE / "index.html").exists(), reason="no built site: run `make docs` first"
)
def test_built_site_pages_load(browser):
    home = Opened(browser, (SITE / "index.html").as_uri())
    assert "jaxbp" in home.page.title()
    home.check_clean()
    api = Opened(browser, (SITE / "api" / "index.html").as_uri())
    assert api.page.locator('[id="jaxbp.Dense"]').count() == 1
    assert "dE/dW = x.T @ dy" in api.page.inner_text("body")
    api.check_clean()
    embedded = Opened(browser, (SITE / "interactive" / "index.html").as_uri())
    frame = embedded.page.frame_locator("iframe#seed-page")
    assert frame.locator("#loss-before").text_content() == "0.3540"
    embedded.check_clean()
