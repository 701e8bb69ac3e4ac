"""The pages in a real headless browser: Debian's chromium + chromium-driver, driven by Selenium.

The test starts and stops its own server; it uploads a generated digit through the file input,
fills the adult form, and reads the label and probability the page shows, which must equal the
JSON API's answer for the same input. Screenshots land in tests/artifacts/ (CI keeps them).
Skipped, saying why, only when no Chromium is installed (`.ci/run` installs it).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from coursepipe.recipes import load_params
from coursepipe.serve.app import create_app
from coursepipe.serve.run import Background
from test_serve import adult_row, png

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="no chromium + chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def url(served_root):
    with Background(create_app(served_root / "export", load_params(served_root / "params.yaml").serve)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # no Selenium Manager download
    yield driver
    driver.quit()


def finished(browser, timeout: float = 30.0):
    """The #result element once the page's request has come back (data-state done or error)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(
        lambda b: b.find_element(By.ID, "result").get_attribute("data-state") in ("done", "error"))
    return browser.find_element(By.ID, "result")


def shown(result) -> tuple[str, float]:
    from selenium.webdriver.common.by import By

    assert result.get_attribute("data-state") == "done", result.text
    first = result.find_element(By.CSS_SELECTOR, ".result")
    return (first.find_element(By.CSS_SELECTOR, ".label").text,
            float(first.find_element(By.CSS_SELECTOR, ".probability").text))


def test_upload_an_image_and_read_the_label(browser, url, tmp_path):
    from selenium.webdriver.common.by import By

    image = tmp_path / "seven.png"
    image.write_bytes(png(np.random.default_rng(7).integers(0, 255, (28, 28), dtype=np.uint8)))
    browser.get(f"{url}/models/mnist")
    assert "mnist" in browser.find_element(By.ID, "title").text
    browser.find_element(By.ID, "files").send_keys(str(image))
    browser.find_element(By.ID, "go").click()
    label, probability = shown(finished(browser))
    bars = browser.find_elements(By.CSS_SELECTOR, "#result .bar")
    thumb = browser.find_element(By.CSS_SELECTOR, "#result img.thumb")  # the upload, beside its label
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb) == 28
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_mnist.png"))
    api = httpx.post(f"{url}/api/models/mnist/images",
                     files=[("files", ("seven.png", image.read_bytes(), "image/png"))]).json()["outputs"][0]
    assert label == api["label"] and probability == pytest.approx(api["probability"], abs=5e-4)
    assert len(bars) == len(api["top"])  # one bar per listed class


def test_a_text_file_named_jpg_shows_the_error(browser, url, tmp_path):
    from selenium.webdriver.common.by import By

    fake = tmp_path / "holiday.jpg"
    fake.write_text("not a picture at all")
    browser.get(f"{url}/models/mnist")
    browser.find_element(By.ID, "files").send_keys(str(fake))
    browser.find_element(By.ID, "go").click()
    result = finished(browser)
    assert result.get_attribute("data-state") == "error"
    assert "holiday.jpg: not an image" in result.text


def test_fill_the_adult_form_and_read_the_answer(browser, url, served_root):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    row = adult_row(served_root)
    browser.get(f"{url}/models/adult")
    form = browser.find_element(By.ID, "row")
    for name, value in row.items():
        field = form.find_element(By.NAME, name)
        if field.tag_name == "select":
            Select(field).select_by_visible_text(str(value))
        else:
            field.clear()
            field.send_keys(str(value))
    browser.find_element(By.ID, "go").click()
    label, probability = shown(finished(browser))
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_adult.png"))
    # the form sends every value as text, as a person types it; the API call does the same
    api = httpx.post(f"{url}/api/models/adult/predict",
                     json={"inputs": [{k: str(v) for k, v in row.items()}]}).json()["outputs"][0]
    assert label == api["label"] and probability == pytest.approx(api["probability"], abs=5e-4)
