"""Screenshots of the four playground panels for docs/ and the README, taken in headless
Chromium (the browser tests' setup): ``python scripts/playground_screenshots.py``.

It trains a tiny MoE and its same-compute dense twin (`moelab compare`'s code path),
serves a fresh runs folder beside them, sizes the textbook preset, trains one Break run
(collapse, tiny scale), routes a sentence through that run's trained model and compares
the MoE with the dense run,
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


def train_moe_vs_dense(out: Path, steps: int) -> None:
    """A tiny MoE and its same-compute dense twin on the same batches (`moelab compare`'s
    code path), so that Compare has a MoE-vs-dense pair to show."""
    import torch

    from moelab.data.loader import prepare_data
    from moelab.lab.config import SCALES
    from moelab.model.config import ModelConfig
    from moelab.train import TrainConfig
    from moelab.train.compare import compare

    torch.set_num_threads(1)
    data = prepare_data(out.parent / ".cache", max_chars_per_domain=20_000, vocab_size=512)
    moe = SCALES["test"].model_config(data.vocab_size)
    dense = ModelConfig.from_dict({**moe.to_dict(), "moe": None})  # d_ff = k x d_expert: same FLOPs per token
    cfg = TrainConfig(steps=steps * 2, batch_size=4, seq_len=32, eval_interval=10, eval_batches=1,
                      checkpoint_interval=0, warmup_steps=4)
    compare({"moe": ("tiny-lab-moe", moe), "dense": ("tiny-lab-dense", dense)}, cfg, data, out, progress=False,
            tensorboard=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--steps", type=int, default=40, help="steps per run of the Break screenshot")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="playground-shots-"))
    models = runs.parent / (runs.name + "-models")
    train_moe_vs_dense(models / "compare", args.steps)
    app = create_app(PlaygroundConfig(runs_dir=runs, model_dirs=(models,)))
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
        time.sleep(0.8)  # typing routes too (debounced 400 ms): let that reply land first
        drv.find_element("id", "route-go").click()
        wait(lambda: drv.find_element("id", "route-tokens").get_attribute("data-state") == "ok"
             and drv.find_elements("css selector", "#route-tokens .tok"), 30, "coloured tokens")
        Select(drv.find_element("id", "route-layer")).select_by_value("all")
        drv.execute_script("document.querySelectorAll('#route-tokens .tok')[3].click();")
        shoot(drv, args.out / "playground-route.png", 1280)

        tab("compare")
        wait(lambda: len(drv.find_elements("css selector", "#compare-table tr")) > 1, 10, "the compare table")
        # Tick the MoE-vs-dense pair only, for moelab compare's figure and two clear curves.
        drv.execute_script("""
            document.querySelectorAll('#compare-table tr').forEach(tr => {
              const box = tr.querySelector('input'); if (!box) return;
              const want = tr.children[1].textContent.startsWith('compare/');
              if (box.checked !== want) box.click(); });""")
        wait(lambda: "reach" in drv.find_element("id", "compare-pair").text, 10, "the MoE-vs-dense figure")
        time.sleep(0.5)
        shoot(drv, args.out / "playground-compare.png", 1280)
    finally:
        drv.quit()
        server.should_exit = True
        thread.join(60)
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(models, ignore_errors=True)


if __name__ == "__main__":
    main()
