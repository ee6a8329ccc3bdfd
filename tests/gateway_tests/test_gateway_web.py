"""The web page in headless Chromium: upload a photo, see boxes drawn and the JSON; a screenshot is kept."""
import json
import shutil
import tempfile

import pytest

pytestmark = pytest.mark.triton

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000"]


def _binary(*names):
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven through chromedriver (Debian's chromium + chromium-driver), fresh profile."""
    from selenium import webdriver  # a test dependency (setup.cfg extra "test")
    chromium, chromedriver = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("chromium / chromedriver not installed (make system-deps installs them)")
    profile = tempfile.mkdtemp(prefix="gateway-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_upload_shows_boxes_and_json(browser, gateway_url, hopper_path, artifacts_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(gateway_url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "ready").get_attribute("class") == "ok")
    browser.find_element(By.ID, "file").send_keys(str(hopper_path))  # the change event submits it
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")

    body = json.loads(browser.find_element(By.ID, "json").text)
    assert [d["label"] for d in body["detections"]] == ["no_mask"]
    canvas = browser.find_element(By.ID, "result-canvas")
    assert canvas.get_attribute("data-detections") == "1"
    assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (512, 600)
    x1, y1, x2, y2 = body["detections"][0]["box"]
    # The pixel on the middle of the box's left edge is the no-mask red.
    red, green, blue, _ = browser.execute_script(
        "return Array.from(arguments[0].getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data)",
        canvas, round(x1), round((y1 + y2) / 2))
    assert red > 180 and green < 80 and blue < 80
    assert "1 face" in browser.find_element(By.ID, "summary").text

    (artifacts_dir / "gateway").mkdir(exist_ok=True)
    screenshot = artifacts_dir / "gateway" / "web_page.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


def test_a_file_the_browser_cannot_type_is_still_detected(browser, gateway_url, hopper_jpeg, tmp_path):
    """A camera frame saved without an extension has no MIME type in the browser; the page sends it as a multipart
    image part, which the API takes (as the raw body it would have been a 415)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    frame = tmp_path / "camera-frame"
    frame.write_bytes(hopper_jpeg)
    browser.get(gateway_url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "ready").get_attribute("class") == "ok")
    assert browser.execute_script("return arguments[0].files", browser.find_element(By.ID, "file")) == []
    browser.find_element(By.ID, "file").send_keys(str(frame))
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.state") == "done"
                                     or d.find_element(By.ID, "error").text)
    assert browser.execute_script("return arguments[0].files[0].type", browser.find_element(By.ID, "file")) == ""
    assert browser.find_element(By.ID, "error").text == ""
    body = json.loads(browser.find_element(By.ID, "json").text)
    assert [d["label"] for d in body["detections"]] == ["no_mask"]


def test_thresholds_typed_in_are_sent_when_detect_is_pressed(browser, gateway_url, hopper_path):
    """The browser's own form check must let any confidence in (0, 1] through: with a 0.05 step it blocked 0.5, the
    model's default, and the press did nothing."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(gateway_url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "ready").get_attribute("class") == "ok")
    browser.find_element(By.ID, "file").send_keys(str(hopper_path))  # the change event submits it once
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
    for confidence in ("0.5", "0.999"):
        browser.execute_script("document.body.dataset.state = ''")
        field = browser.find_element(By.ID, "confidence")
        field.clear()
        field.send_keys(confidence)
        assert browser.execute_script("return document.getElementById('form').checkValidity()"), confidence
        browser.find_element(By.ID, "detect").click()
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.state") == "done")
        scores = [face["score"] for face in json.loads(browser.find_element(By.ID, "json").text)["detections"]]
        assert scores and min(scores) > float(confidence)
