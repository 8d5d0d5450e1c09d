"""Screenshots of the four playground panels for docs/ and the README, taken in headless
Chromium (the browser tests' setup): ``python scripts/playground_screenshots.py``.

It serves a fresh runs folder, sizes the textbook preset, trains one Break run (collapse,
tiny scale), routes a sentence through that run's trained model and compares its runs,
then writes ``docs/img/playground-{size,route,break,compare,phone}.png``, quantised to 256
colours (a few tens of KB each). Needs chromium + chromedriver on PATH (`make browser`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import Select

from moelab.playground.app import create_app, make_server
from moelab.playground.config import PlaygroundConfig

ROOT = Path(__file__).resolve().parents[1]


def wait(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)
    return value


def shoot(drv, path: Path, width: int) -> None:
    """The whole page at `width` CSS px (up to 2400 px tall)."""
    metrics = {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600}
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    time.sleep(0.3)  # charts redraw on resize
    height = drv.execute_script("return document.documentElement.scrollHeight")
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics | {"height": min(max(height, 600), 2400)})
    time.sleep(0.3)
    drv.save_screenshot(str(path))
    drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--steps", type=int, default=40, help="steps per run of the Break screenshot")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="playground-shots-"))
    app = create_app(PlaygroundConfig(runs_dir=runs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = make_server(app, port=port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait(lambda: server.started, 20, "the server")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        drv.get(f"http://127.0.0.1:{port}/")
        wait(lambda: drv.find_element("tag name", "body").get_attribute("data-ready") == "1", 20, "the page")
        tab = lambda name: drv.find_element("css selector", f"#tabs button[data-panel='{name}']").click()  # noqa: E731

        Select(drv.find_element("id", "preset")).select_by_value("textbook-8x7b")
        wait(lambda: "63.0B" in drv.find_element("id", "size-headline").text, 10, "the textbook preset")
        shoot(drv, args.out / "playground-size.png", 1280)
        shoot(drv, args.out / "playground-phone.png", 390)

        tab("break")
        steps = drv.find_element("id", "k-steps")
        steps.clear()
        steps.send_keys(str(args.steps))
        drv.find_element("id", "break-run").click()
        wait(lambda: drv.find_elements("id", "verdict-headline"), 300, "the verdict")
        shoot(drv, args.out / "playground-break.png", 1280)

        tab("route")
        model = str(next(runs.glob("*/aux-loss")))
        # The list is redrawn when the tab opens: read it in one script (no stale handles).
        options = "return Array.from(document.querySelectorAll('#route-model option')).map(o => o.value);"
        wait(lambda: model in drv.execute_script(options), 10, "the model list")
        Select(drv.find_element("id", "route-model")).select_by_value(model)
        text = drv.find_element("id", "route-text")
        text.clear()
        text.send_keys("The router sends every token to its top experts, and the experts learn to specialise.")
        drv.find_element("id", "route-go").click()
        wait(lambda: drv.find_elements("css selector", "#route-tokens .tok"), 30, "coloured tokens")
        Select(drv.find_element("id", "route-layer")).select_by_value("all")
        drv.find_elements("css selector", "#route-tokens .tok")[3].click()
        shoot(drv, args.out / "playground-route.png", 1280)

        tab("compare")
        wait(lambda: len(drv.find_elements("css selector", "#compare-table tr")) > 1, 10, "the compare table")
        time.sleep(0.5)
        shoot(drv, args.out / "playground-compare.png", 1280)
    finally:
        drv.quit()
        server.should_exit = True
        thread.join(60)
        shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
