"""The web page at ``/`` in a real headless browser (Debian's ``chromium`` + ``chromium-driver``, driven by selenium;
scripts/setup.sh installs them): load it, pick a model, submit, wait for both images, screenshot, check the DOM and
that the two images are the API's for the seed shown. Loopback only; every wait is bounded."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_serve import assert_same_images, decode, models, post, serving  # noqa: F401 (models: the fixture)

pytest.importorskip("fastapi", reason="the serve extra: pip install 'ssg-engine[serve]' (scripts/setup.sh installs it)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium: pip install selenium (scripts/setup.sh installs it)")
WAIT_S = 60
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, DRIVER):
        if not Path(path).is_file():
            pytest.fail(f"{path} is missing: apt-get install chromium chromium-driver (scripts/setup.sh does)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.parametrize("model, pick", [("fashion-mnist-var", "class"), ("fashion-mnist-infinity", "prompt")])
def test_the_page_shows_baseline_and_ssg_with_the_seed(models, browser, tmp_path, model, pick):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    with serving(models) as (host, _):
        browser.get(f"http://{host}/")
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        Select(browser.find_element(By.ID, "model")).select_by_value(model)
        if pick == "class":
            assert not browser.find_element(By.ID, "prompt").is_displayed()
            Select(browser.find_element(By.ID, "class")).select_by_visible_text("sneaker")
        else:
            assert not browser.find_element(By.ID, "class").is_displayed()
            field = browser.find_element(By.ID, "prompt")
            field.clear()
            field.send_keys("a photo of a bag")
        browser.execute_script("const b = document.getElementById('beta'); b.value = '0.8'; b.dispatchEvent(new Event('input'));")
        browser.find_element(By.ID, "seed").send_keys("1234")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "done" or d.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text == ""
        for image in ("baseline", "ssg"):  # loaded and decoded by the browser
            assert browser.execute_script(f"return document.getElementById('{image}').naturalWidth") == 32
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        assert browser.find_element(By.ID, "seed-used").text == "1234"
        assert browser.find_element(By.ID, "beta-shown").text == "0.8"
        assert browser.find_element(By.ID, "beta-value").text == "0.8"
        cond = {"class_labels": [7]} if pick == "class" else {"prompt": "a photo of a bag"}
        shown = {i: browser.find_element(By.ID, i).get_attribute("src").split(",", 1)[1] for i in ("baseline", "ssg")}
        for image, extra in (("baseline", {}), ("ssg", {"ssg_scale": 0.8})):
            status, body = post(host, {"model": model, "seed": 1234, **cond, **extra})
            assert status == 200
            assert_same_images(decode({"b64_json": shown[image]}), decode(body["data"][0]), image)
        assert shown["baseline"] != shown["ssg"]  # SSG changed the image
