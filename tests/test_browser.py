"""The web page in a real browser: headless Chromium (Debian's chromium + chromium-driver) via selenium.

Skipped when chromium, chromedriver or selenium is missing. By default it serves two randomly
initialised tiny models; set FMLM_BROWSER_CKPTS="flm=RUN,fmlm=RUN" to serve trained ones and
FMLM_SCREENSHOT=PATH to keep the screenshot (the README's docs/serve-page.png was made so).
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1500,900",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium / chromedriver not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models(tmp_path):
    from fmlm.serve import load_models, wrap_model

    spec = os.environ.get("FMLM_BROWSER_CKPTS")
    if spec:
        return load_models([s for s in spec.split(",") if s])
    from test_serve import tiny_model

    return [
        wrap_model("flm", tiny_model("flm", tmp_path / "flm")),
        wrap_model("fmlm", tiny_model("semigroup", tmp_path / "fmlm")),
    ]


@pytest.fixture
def server(tmp_path):
    import uvicorn

    from fmlm.serve import create_app

    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(create_app(_models(tmp_path)), host="127.0.0.1", port=port, log_level="warning")
    )
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 600  # generous: a loaded machine starts slowly; this polls the state
    while not srv.started and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
    assert srv.started
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium try to download a driver
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(f)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(300)
    yield driver
    driver.quit()


def test_page_generates_side_by_side(server, browser, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 600)  # generous: the machine may be busy
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    panels = browser.find_elements(By.CSS_SELECTOR, ".panel")
    assert [p.get_attribute("data-model") for p in panels] == ["flm", "fmlm"]
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("3")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: all(p.get_attribute("data-done") == "1" for p in panels))

    for p in panels:
        shown = p.find_element(By.CSS_SELECTOR, ".text").text
        assert shown.strip(), "no text on the page"
        assert "ms compute" in p.find_element(By.CSS_SELECTOR, ".status").text
        assert len(p.find_elements(By.CSS_SELECTOR, ".text span")) > 0  # coloured tokens
        steps = int(p.find_element(By.CSS_SELECTOR, ".steps").get_attribute("value"))
        # The page shows what the JSON API returns for the same request.
        api = httpx.post(
            server + "/v1/generate",
            json={"model": p.get_attribute("data-model"), "seed": 3, "steps": steps},
            timeout=600,
        ).json()
        assert p.get_attribute("data-text") == api["texts"][0]
    assert int(panels[0].find_element(By.CSS_SELECTOR, ".steps").get_attribute("value")) == 32
    assert int(panels[1].find_element(By.CSS_SELECTOR, ".steps").get_attribute("value")) == 1

    shot = Path(os.environ.get("FMLM_SCREENSHOT") or tmp_path / "page.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
