"""The lab's dashboard in a real browser (Debian's chromium, headless,
through chromedriver and selenium): usage: dashboard_check.py URL OUTDIR.

Opens the page, starts the load with its button, finds the leader the
page draws, presses its "kill" button, and waits until the page shows
another leader, the old one exited, and the timeline's "exited" and
"leader elected" lines; checks from the page that the load goes on and
that its errors, if any, all fell within the failover (from the kill to
a few seconds after the new leader showed); restarts the old leader with
its button and waits until the page shows it back as a voter; adds a web
server with its button and sees it take a share of the load. Saves screenshots (desktop and phone-sized) in
OUTDIR. Prints OK, or fails."""
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

url, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)

options = webdriver.ChromeOptions()
for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"]:
    options.add_argument(arg)
options.binary_location = "/usr/bin/chromium"
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
driver.set_page_load_timeout(30)


def until(what, check, within=45):
    deadline = time.time() + within
    while True:
        try:
            got = check()
        except Exception:  # the page is redrawn under us: look again
            got = None
        if got:
            return got
        if time.time() > deadline:
            driver.save_screenshot(os.path.join(out, "failed.png"))
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.2)


def leader():
    nodes = driver.find_elements(By.CSS_SELECTOR, ".node.leader")
    return nodes[0].get_attribute("data-name") if nodes else None


def node(name):
    return driver.find_element(By.CSS_SELECTOR, f'.node[data-name="{name}"]')


def timeline(kind, name):
    for li in driver.find_elements(By.CSS_SELECTOR, f'#timeline li[data-kind="{kind}"]'):
        if li.find_element(By.TAG_NAME, "b").text == name:
            return True
    return False


try:
    driver.get(url)
    old = until("the page draws a leader", leader)
    tiers = [t.get_attribute("data-role") for t in driver.find_elements(By.CSS_SELECTOR, ".tier")]
    assert tiers == ["lb", "web", "db"], tiers
    assert len(driver.find_elements(By.CSS_SELECTOR, '.tier[data-role="db"] .node')) == 5
    # Stage 4 without --netns: no DNS to move visitors, no namespaces to
    # cut, so those scenarios are not offered.
    for hidden in ["kill-lb", "partition-leader"]:
        assert not driver.find_element(By.CSS_SELECTOR, f'[data-scenario="{hidden}"]').is_displayed(), hidden
    assert driver.find_element(By.CSS_SELECTOR, '[data-scenario="kill-leader"]').is_displayed()
    driver.find_element(By.ID, "start-load").click()
    load = lambda key: int(driver.find_element(By.ID, "load").get_attribute("data-" + key.replace("firstError", "first-error").replace("lastError", "last-error")) or 0)
    until("the load answered", lambda: load("ok") >= 30)
    # Each web server shows its latency and errors, with a chart of its
    # last minutes; each database node its lag.
    until("web-1's p99 on the page", lambda: node("web-1").get_attribute("data-p99"))
    figures = node("web-1").find_element(By.CSS_SELECTOR, ".figures").text
    assert "p99" in figures and "errors" in figures, figures
    until("web-1's chart drawn", lambda: len(node("web-1").find_element(By.CSS_SELECTOR, "polyline.rps").get_attribute("points").split()) >= 3)
    assert node(old).get_attribute("data-lag") is not None
    driver.save_screenshot(os.path.join(out, "1-running.png"))

    killed_ms = time.time() * 1000
    node(old).find_element(By.CSS_SELECTOR, 'button[data-control="kill"]').click()
    new = until("another leader on the page", lambda: (leader() if leader() not in (None, old) else None))
    elected_ms = time.time() * 1000
    answered = load("ok")
    until("the load goes on after the failover", lambda: load("ok") >= answered + 40)
    until("the old leader shown exited", lambda: node(old).get_attribute("data-state") == "exited")
    until("the timeline shows the exit", lambda: timeline("exited", old))
    until("the timeline shows the election", lambda: timeline("leader_elected", new))
    driver.find_element(By.ID, "stop-load").click()
    until("the load stopped", lambda: driver.find_element(By.ID, "load").get_attribute("data-running") == "false")
    errors = load("errors")
    if errors:
        first, last = load("firstError"), load("lastError")
        assert first >= killed_ms - 1000 and last <= elected_ms + 5000, (
            f"{errors} errors from {first} to {last}, outside the failover ({killed_ms} to {elected_ms})"
        )
    driver.save_screenshot(os.path.join(out, "2-leader-killed.png"))

    node(old).find_element(By.CSS_SELECTOR, 'button[data-control="restart"]').click()
    until(
        "the old leader back as a voter",
        lambda: node(old).get_attribute("data-state") == "up" and node(old).get_attribute("data-kind") == "voter",
        within=60,
    )
    until("the timeline shows the restart", lambda: timeline("restarted", old))
    driver.save_screenshot(os.path.join(out, "3-restarted.png"))

    driver.find_element(By.CSS_SELECTOR, 'button[data-add="web"]').click()
    until(
        "the added web server on the page",
        lambda: node("web-3").get_attribute("data-state") == "up",
        within=60,
    )
    until("the timeline shows it added", lambda: timeline("added", "web-3"))
    # It takes traffic: the load started again reaches it through the
    # load balancer, as the page's figures for it show.
    driver.find_element(By.ID, "start-load").click()
    until("web-3 takes a share of the load", lambda: float(node("web-3").get_attribute("data-rps") or 0) > 0, within=30)
    driver.find_element(By.ID, "stop-load").click()
    driver.save_screenshot(os.path.join(out, "3b-web-added.png"))

    driver.set_window_size(390, 844)
    time.sleep(0.5)
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400, f"the page is {width}px wide on a phone"
    driver.save_screenshot(os.path.join(out, "4-phone.png"))
    print(f"OK {old} {new}")
finally:
    driver.quit()
