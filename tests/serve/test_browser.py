"""The chat page in a real browser: headless Chromium (Debian's package) driven by Selenium uploads a real
VQA-RAD image, asks, and sees the streamed answer, then asks again in the same conversation."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from llavamed_fast.data.templates import Message
from llavamed_fast.model import build
from llavamed_fast.model.generate import greedy_generate
from llavamed_fast.serve.api import ServerLimits
from llavamed_fast.serve.engine import Engine
from llavamed_fast.serve.server import start_in_thread

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKENS = 12


def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail(
            "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless, and no background traffic: this machine has no network beyond loopback.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER)
    return webdriver.Chrome(options=options, service=service)


def test_upload_ask_and_continue_in_the_browser(tmp_path, vqa_rad_images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image_path = vqa_rad_images[12]
    model, processor = build("tiny-v1.5", seed=6)
    image = Image.open(image_path).convert("RGB")
    first = greedy_generate(
        model, processor, [Message("user", "<image>\nWhat organ is shown?")], [image], max_new_tokens=TOKENS
    )
    engine = Engine(*build("tiny-v1.5", seed=6))
    limits = ServerLimits(max_tokens=TOKENS, default_max_tokens=TOKENS)
    with start_in_thread(engine, model_name="tiny-browser", limits=limits) as server:
        driver = browser(tmp_path)
        try:
            driver.get(server.url + "/")
            assert "Research use only" in driver.find_element(By.ID, "disclaimer").text
            driver.find_element(By.ID, "image").send_keys(str(image_path))
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: "Image loaded" in d.find_element(By.ID, "status").text)
            driver.find_element(By.ID, "question").send_keys("What organ is shown?")
            driver.find_element(By.ID, "send").click()
            wait.until(lambda d: d.find_element(By.ID, "status").text == "Done.")
            answers = driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")
            assert [a.text.removeprefix("Assistant: ").strip() for a in answers] == [first.text]
            assert not driver.find_elements(By.CSS_SELECTOR, ".turn.error")

            # A second question continues the conversation: the page sends the whole exchange again.
            second = greedy_generate(
                model,
                processor,
                [
                    Message("user", "<image>\nWhat organ is shown?"),
                    Message("assistant", first.text),
                    Message("user", "Is it normal?"),
                ],
                [image],
                max_new_tokens=TOKENS,
            )
            driver.find_element(By.ID, "question").send_keys("Is it normal?")
            driver.find_element(By.ID, "send").click()
            wait.until(
                lambda d: (
                    len(d.find_elements(By.CSS_SELECTOR, ".turn.assistant")) == 2
                    and d.find_element(By.ID, "status").text == "Done."
                )
            )
            answers = driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")
            assert answers[1].text.removeprefix("Assistant: ").strip() == second.text
        finally:
            driver.quit()
