"""The status page in a real browser (Chromium, driven by Selenium): it loads, shows a
destination that fails as failing, and its search finds a study that was sent."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pydicom
import pytest

from tests.interop.conftest import copy_as_series
from tests.support.peers import Destination, data, free_port, metric_value, send, wait_until

pytestmark = pytest.mark.interop

SCREENSHOT = os.environ.get("STATUS_PAGE_SCREENSHOT")  # a path: save the page there (for the README)


@pytest.fixture
def browser():
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium and chromium-driver are not installed (scripts/install-peers.sh)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,900"):
        options.add_argument(flag)
    service = Service(executable_path=driver)
    chrome = webdriver.Chrome(service=service, options=options)
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()  # stops chromedriver and the browser it started


def test_the_status_page_shows_a_failing_destination_and_finds_a_sent_study(router_factory, pacs, browser, tmp_path):
    from selenium.webdriver.common.by import By

    router = router_factory([
        Destination("PACS", pacs.port, '[[rule]]\nsyntax = "jpeg-ls-lossless"\n'),
        Destination("ARCHIVE", free_port(), '[[rule]]\nsyntax = "original"\n', ae_title="ARCHIVE",
                    retry="{ max_attempts = 50, backoff_s = 0.5, max_backoff_s = 2 }"),
    ])
    files = copy_as_series([data("693_UNCR.dcm")], tmp_path / "study", copies=3)
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    assert send(router.port, files) == [0, 0, 0]
    wait_until(lambda: pacs.count() == 3, 30, what="the study at the PACS")
    wait_until(lambda: metric_value(router.metrics(), "dicom_router_forward_failures_total", destination="ARCHIVE",
                                    outcome="retry") >= 1, 30, what="the archive failing")

    base = f"http://127.0.0.1:{router.metrics_port}"
    browser.get(base + "/")
    assert "dicom-router" in browser.title
    archive = browser.find_element(By.ID, "dest-ARCHIVE")
    assert "failing" in archive.text
    cells = archive.find_elements(By.TAG_NAME, "td")
    assert int(cells[3].text) + int(cells[4].text) == 3  # pending and in flight
    assert browser.find_element(By.ID, "dest-PACS").text
    failures = browser.find_element(By.ID, "failures").text
    assert "ARCHIVE" in failures and "cannot connect" in failures

    box = browser.find_element(By.ID, "uid")
    box.send_keys(study)
    box.submit()
    wait_until(lambda: browser.find_elements(By.ID, "summary"), 10, what="the trace")
    summary = browser.find_element(By.ID, "summary").text
    assert "3 instance(s)" in summary and "3/3 delivered to PACS" in summary and "0/3 delivered to ARCHIVE" in summary
    rows = browser.find_element(By.ID, "trace").text
    assert "jpeg-ls-lossless" in rows and "retrying" in rows
    page = browser.page_source
    assert "PatientName" not in page and "Patient" not in page

    if SCREENSHOT:
        browser.get(base + "/")
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(SCREENSHOT)
