"""End to end in a real browser: `difflab serve` on a free localhost port, driven by headless
Debian Chromium through selenium + chromedriver (`apt-get install chromium chromium-driver`;
nothing is downloaded at run time). Loads the page, clicks the latent plane, samples in the
Diffusion tab, fetches the sampled image back from the server and checks it is not blank, and
screenshots each tab.

Skipped only where Chromium is absent and CI is not set; in CI (CI=true) a missing browser
fails. To refresh the README's screenshots from the real demo models:

    DIFFLAB_APP_CKPT=runs/demo DIFFLAB_SCREENSHOTS=docs pytest tests/test_browser.py -m browser
"""

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _app_models import make_tiny_models

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-dev-shm-usage", "--window-size=1280,1500"]


def _require_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test but {', '.join(missing)} is missing "
                        "(.ci/run installs chromium chromium-driver)")
        pytest.skip(f"no {', '.join(missing)}: apt-get install chromium chromium-driver")
    pytest.importorskip("gradio", reason="the app needs the [app] extra")
    pytest.importorskip("selenium", reason="the browser test needs selenium (dev extra)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _require_browser()
    ckpt = os.environ.get("DIFFLAB_APP_CKPT")
    folders = [ckpt] if ckpt else [str(make_tiny_models(tmp_path_factory.mktemp("app")))]
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "serve.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "difflab.cli", "serve", "--port", str(port)]
    for f in folders:
        argv += ["--ckpt", f]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300  # generous: CI machines may be busy
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"difflab serve did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def driver(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in BROWSER_ARGS:
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait(d, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.25).until(condition)


def _image_src(d, elem_id: str) -> str | None:
    """The URL of the picture shown in the gr.Image with ``elem_id``, once it has loaded."""
    return d.execute_script(
        "const i = document.querySelector(`#${arguments[0]} img`);"
        "return i && i.complete && i.naturalWidth > 0 ? i.src : null;", elem_id)


def _fetch(src: str) -> np.ndarray:
    with urllib.request.urlopen(src, timeout=30) as r:  # the app's own file route, localhost
        return np.asarray(Image.open(io.BytesIO(r.read())).convert("L"), dtype=np.float64)


def _tab(d, name: str) -> None:
    from selenium.webdriver.common.by import By

    tab = _wait(d, lambda d: next((b for b in d.find_elements(By.CSS_SELECTOR,
                                                               "button[role='tab']")
                                   if b.text.strip() == name), None))
    tab.click()
    time.sleep(0.5)


def _screenshot(d, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    d.save_screenshot(str(path))
    with Image.open(path) as im:
        assert im.size[0] >= 1000 and np.asarray(im.convert("L")).std() > 5
    target = os.environ.get("DIFFLAB_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)


def test_page_loads_and_the_vae_plane_decodes_a_click(driver, server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    d = driver
    d.get(server)
    _wait(d, lambda d: _image_src(d, "vae-plane"))
    before = _image_src(d, "vae-decoded")
    plane = d.find_element(By.CSS_SELECTOR, "#vae-plane img")
    w, h = plane.size["width"], plane.size["height"]
    ActionChains(d).move_to_element_with_offset(plane, int(w * 0.3), int(-h * 0.3)).click()\
        .perform()
    after = _wait(d, lambda d: (s := _image_src(d, "vae-decoded")) != before and s)
    assert _fetch(after).std() > 5
    d.find_element(By.ID, "vae-interpolate").click()
    strip = _wait(d, lambda d: _image_src(d, "vae-strip"))
    assert _fetch(strip).std() > 5
    _screenshot(d, tmp_path, "app_vae.png")


def test_sampling_in_the_diffusion_tab_shows_a_non_blank_image(driver, server, tmp_path):
    from selenium.webdriver.common.by import By

    d = driver
    if d.current_url != server:
        d.get(server)
    _tab(d, "Diffusion")
    assert _image_src(d, "sample-grid") is None  # nothing before sampling
    d.find_element(By.ID, "sample-btn").click()
    src = _wait(d, lambda d: _image_src(d, "sample-grid"))
    pixels = _fetch(src)
    assert pixels.shape[0] >= 64 and pixels.std() > 10, pixels.std()
    _wait(d, lambda d: _image_src(d, "sample-trajectory"))
    anim = _wait(d, lambda d: _image_src(d, "sample-anim"))
    with urllib.request.urlopen(anim, timeout=30) as r:
        with Image.open(io.BytesIO(r.read())) as gif:
            assert gif.format == "GIF" and gif.n_frames > 1
    d.execute_script("window.scrollTo(0, 0)")
    _screenshot(d, tmp_path, "app_diffusion.png")


def test_schedules_tab_shows_the_plot(driver, server, tmp_path):
    d = driver
    if d.current_url != server:
        d.get(server)
    _tab(d, "Noise schedules")
    src = _wait(d, lambda d: _image_src(d, "sched-plot"))
    assert _fetch(src).std() > 5
    _wait(d, lambda d: _image_src(d, "sched-noised"))
    _screenshot(d, tmp_path, "app_schedules.png")
