"""The playground page in a real headless Chromium (selenium + the system chromedriver).

One browser and one live server for the module. Skipped, with the reason, only where no
Chromium/chromedriver is installed (`make test` installs Debian's `chromium` and
`chromium-driver` first; see the README).
"""

from __future__ import annotations

import json

import pytest

from moelab.cli.main import main
from moelab.playground.sizing import moelab_config_json

from .conftest import start_live, wait_for

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")


def find_chromium() -> tuple[str, str] | None:
    import shutil

    driver = shutil.which("chromedriver")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return (browser, driver) if driver and browser else None


FOUND = find_chromium()
pytestmark = pytest.mark.skipif(FOUND is None, reason="no chromium + chromedriver on PATH (Debian: apt-get install "
                                "chromium chromium-driver; `make test` does it as root)")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = FOUND[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(FOUND[1]), options=opts)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def live(served):
    app, cfg = served
    run = start_live(app, cfg)
    yield run
    run.stop()


@pytest.fixture()
def page(browser, live):
    browser.get(live.url + "/")
    wait_for(lambda: browser.find_element("tag name", "body").get_attribute("data-ready") == "1", 20, "the page")
    return browser


def by_id(drv, id_: str):
    return drv.find_element("id", id_)


def table_cells(drv) -> dict[str, str]:
    # In one script: the table is redrawn on every reply, so element handles go stale.
    return drv.execute_script(
        "const o = {}; document.querySelectorAll('#size-table tr[data-label]').forEach("
        "r => { o[r.dataset.label] = r.querySelector('td').textContent; }); return o;")


def set_control(drv, name: str, value) -> None:
    el = by_id(drv, f"c-{name}")
    el.clear()
    el.send_keys(str(value))


def cli_cells(capsys, tmp_path, controls) -> dict[str, str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(moelab_config_json(controls)))
    assert main(["size", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    from moelab.accounting.report import table_rows

    assert main(["size", str(path)]) == 0
    text = capsys.readouterr().out
    cells = {row[0]: row[1][0] for row in table_rows([r]) if not isinstance(row, str)}
    for label, value in cells.items():  # the cells are what the CLI printed
        assert any(ln.startswith(label) and ln.endswith(value) for ln in text.splitlines())
    return cells


def test_changing_experts_and_k_shows_what_moelab_size_prints(page, tmp_path, capsys):
    before = table_cells(page)["total"]
    set_control(page, "num_experts", 16)
    set_control(page, "top_k", 4)
    expected = cli_cells(capsys, tmp_path, {"num_experts": 16, "top_k": 4})
    assert expected["total"] != before
    wait_for(lambda: table_cells(page) == expected, 10, "the page to show moelab size's cells")
    assert by_id(page, "size-headline").text.startswith(f"{expected['total']} total, "
                                                       f"{expected['active per token']} active, 12 of 16")
    cards = page.find_element("css selector", ".card[data-label='total'] .v").text
    assert cards == expected["total"]


def test_textbook_preset(page):
    from selenium.webdriver.support.ui import Select

    Select(by_id(page, "preset")).select_by_value("textbook-8x7b")
    wait_for(lambda: "63.0B" in by_id(page, "size-headline").text, 10, "the textbook preset")
    text = by_id(page, "size-headline").text + "\n" + by_id(page, "size-cards").text
    for expected in ("63.0B", "21.0B", "6 of 8", "75%"):
        assert expected in text
    assert by_id(page, "c-num_experts").get_attribute("value") == "8"


def test_bad_value_shows_the_cli_line_next_to_the_control(page):
    set_control(page, "top_k", 12)
    err = page.find_element("css selector", ".err[data-for='top_k']")
    wait_for(lambda: err.text, 10, "the error next to k")
    assert err.text == "MoEConfig.top_k=12 exceeds num_experts=8: a token cannot be sent to more experts than exist"
    assert by_id(page, "c-top_k").get_attribute("aria-invalid") == "true"
    set_control(page, "top_k", 2)
    wait_for(lambda: not err.text, 10, "the error to clear")


def test_route_colours_tokens(page, model_dir):
    page.find_element("css selector", "#tabs button[data-panel='route']").click()
    options = "return Array.from(document.querySelectorAll('#route-model option')).map(o => o.value);"
    wait_for(lambda: str(model_dir) in page.execute_script(options), 10, "the model list")
    page.execute_script("arguments[0].value = arguments[1];", by_id(page, "route-model"), str(model_dir))
    text = by_id(page, "route-text")
    text.clear()
    text.send_keys("The quick brown fox jumps over the lazy dog.")
    by_id(page, "route-go").click()
    # Typing also routes (debounced), so the tokens may be redrawn: read them in one script.
    read = ("return Array.from(document.querySelectorAll('#route-tokens .tok')).map(t => "
            "[t.textContent, getComputedStyle(t).backgroundColor, t.title]);")
    wait_for(lambda: by_id(page, "route-tokens").get_attribute("data-state") == "ok" and page.execute_script(read),
             20, "coloured tokens")
    toks = page.execute_script(read)
    assert "".join(t[0] for t in toks) == "The quick brown fox jumps over the lazy dog."
    colours = {t[1] for t in toks}
    assert len(colours) > 1 and "rgba(0, 0, 0, 0)" not in colours
    assert "layer 0: e" in toks[0][2] and "layer 1: e" in toks[0][2]
    # "all layers": one coloured line per MoE layer. Chosen in one script: the debounced
    # route of the typing may still answer and rebuild the options under a Select.
    page.execute_script("const s = document.getElementById('route-layer'); s.value = 'all';"
                        "s.dispatchEvent(new Event('change'));")
    wait_for(lambda: len(page.execute_script(read)) == 2 * len(toks), 10, "one line per layer")
    labels = "return Array.from(document.querySelectorAll('#route-tokens .toklabel')).map(e => e.textContent);"
    assert page.execute_script(labels) == ["layer 0", "layer 1"]


def test_break_streams_points_then_a_verdict(page):
    from selenium.webdriver.support.ui import Select

    page.find_element("css selector", "#tabs button[data-panel='break']").click()
    Select(by_id(page, "b-experiment")).select_by_value("collapse")
    Select(by_id(page, "b-scale")).select_by_value("tiny")
    steps = by_id(page, "k-steps")
    steps.clear()
    steps.send_keys("8")
    by_id(page, "break-run").click()
    counter = by_id(page, "break-points")
    wait_for(lambda: int(counter.get_attribute("data-count") or 0) > 0, 60, "live points")
    first = int(counter.get_attribute("data-count"))
    verdict = wait_for(lambda: page.find_elements("id", "verdict-headline"), 90, "the verdict")
    assert first >= 1 and int(counter.get_attribute("data-count")) == 4 * 8  # every step of the four runs
    assert verdict[0].text.startswith("verdict: effect")
    lines = [li.text for li in page.find_elements("css selector", "#break-verdict li")]
    # The collapse verdict's lines: each run's state, then its numbered rules.
    assert len(lines) > 3 and any(t.startswith("[1] collapse") for t in lines), lines
    assert page.find_elements("css selector", "#chart-loss path.series")  # the curves were drawn
    assert len(page.find_elements("css selector", "#chart-load rect.bar")) == 8
    # The load chart shows any run: the broken one has its load on few experts.
    Select(by_id(page, "load-run")).select_by_value("broken-no-aux")
    heights = page.execute_script("return Array.from(document.querySelectorAll('#chart-load rect.bar'))"
                                  ".map(r => +r.getAttribute('height'));")
    assert len(heights) == 8 and max(heights) > 0


def test_compare_and_phone_width(page, browser):
    page.find_element("css selector", "#tabs button[data-panel='compare']").click()
    wait_for(lambda: len(page.find_elements("css selector", "#compare-table tr")) > 1, 10, "the compare table")
    assert "broken-no-aux" in by_id(page, "compare-table").text
    browser.set_window_size(390, 844)
    try:
        for panel in ("size", "route", "break", "compare"):
            page.find_element("css selector", f"#tabs button[data-panel='{panel}']").click()
            # Nothing wider than the phone: no sideways scrolling of the page.
            width = page.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390, f"{panel} is {width} px wide at phone width"
    finally:
        browser.set_window_size(1280, 1000)
