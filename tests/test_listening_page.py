"""The exported listening page in a real browser: Debian's Chromium driven by Selenium.

Opens index.html from file:// with no network, checks the console stays clean, plays a
clip, rates, answers a pair, downloads the CSV and feeds it to `listening_results`.
"""
import importlib.util
import os
import pathlib
import shutil
import time

import numpy as np
import pytest

from conftest import IN_CI
from midijax import export
from midijax.notes import Notes

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
XSS = "<script>alert(1)</script>"


def _require_tools():
  missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
  missing += [t for t in ("fluidsynth",) if not shutil.which(t)]
  if not os.path.exists(export.DEFAULT_SOUNDFONT):
    missing.append(export.DEFAULT_SOUNDFONT)
  if importlib.util.find_spec("selenium") is None:
    missing.append("python package selenium")
  if missing:
    msg = (f"missing {missing} (Debian: chromium chromium-driver fluidsynth "
           "fluid-soundfont-gm; pip: selenium)")
    if IN_CI:
      pytest.fail("CI=true but " + msg)
    pytest.skip(msg)


def _phrase(transpose, velocity=80, drums=False):
  if drums:
    start = np.arange(8) * 0.25
    return Notes.from_arrays(np.where(np.arange(8) % 2, 42, 36), start, start + 0.1, velocity,
                             is_drum=True)
  start = np.arange(6) * 0.3
  return Notes.from_arrays(np.array([60, 62, 64, 65, 67, 72]) + transpose, start, start + 0.5,
                           velocity)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  _require_tools()
  out = tmp_path_factory.mktemp("page")
  clips = [
      export.Clip("zzpage_model", _phrase(0, drums=True), {"seed": 1}),
      export.Clip("zzpage_real", _phrase(2), {"real_file": "/corpus/zz_secret.mid"},
                  display=XSS),
      export.Clip("zzpage_real", _phrase(-12), {}, pair_group="g", role="prompt"),
      export.Clip("zzpage_model", _phrase(-5), {}, pair_group="g", role="continuation"),
      export.Clip("zzpage_real", _phrase(-7), {}, pair_group="g", role="continuation"),
  ]
  export.export_listening(clips, out, 1.5, seed=11, settings={"title": "Page " + XSS})
  return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  _require_tools()
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  # Never let Selenium Manager look for drivers or browsers online.
  os.environ.setdefault("SE_OFFLINE", "true")
  downloads = tmp_path_factory.mktemp("downloads")
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
              "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
              "--disable-default-apps", "--disable-extensions", "--mute-audio",
              "--autoplay-policy=no-user-gesture-required", "--window-size=1000,900",
              f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):
    opts.add_argument(arg)
  opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
  opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                         "download.prompt_for_download": False})
  driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
  driver.set_script_timeout(20)
  driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                         {"behavior": "allow", "downloadPath": str(downloads)})
  driver.downloads = pathlib.Path(downloads)
  yield driver
  driver.quit()


def _severe(driver):
  return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def _wait_for(predicate, timeout=10.0):
  end = time.time() + timeout
  while time.time() < end:
    value = predicate()
    if value:
      return value
    time.sleep(0.1)
  return predicate()


def test_rate_play_download_and_analyse(study, browser):
  from selenium.common.exceptions import NoAlertPresentException  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  d = browser
  d.get((study / "rater" / "index.html").as_uri())
  assert d.title == "Page " + XSS
  assert _severe(d) == []

  d.find_element(By.ID, "rater-name").send_keys('rater "one", A')
  d.find_element(By.ID, "start").click()
  assert d.find_element(By.ID, "progress").text == "0 of 5 answered"
  assert d.find_element(By.ID, "rater-label").text == 'rater "one", A'
  # Metadata with markup is shown as text, and nothing ran.
  assert d.find_element(By.TAG_NAME, "h1").text == "Page " + XSS
  assert XSS in [e.text for e in d.find_elements(By.CSS_SELECTOR, ".display")]
  with pytest.raises(NoAlertPresentException):
    d.switch_to.alert.text  # pylint: disable=pointless-statement
  assert d.execute_script("return document.querySelectorAll('script').length") == 2

  # Play the first clip: play() resolves and the position advances.
  audio = d.find_elements(By.CSS_SELECTOR, "#ratings audio")[0]
  result = d.execute_async_script(
      "const a = arguments[0], done = arguments[arguments.length - 1];"
      "a.play().then(() => done('ok'), (e) => done(String(e)));", audio)
  assert result == "ok"
  assert _wait_for(lambda: d.execute_script("return arguments[0].currentTime", audio) > 0.05)
  d.execute_script("arguments[0].pause()", audio)
  clip_id = audio.get_attribute("data-clip-id")

  # Rate it 4, answer the pair with side A.
  d.find_element(By.ID, f"rating-{clip_id}-4").click()
  pair = d.find_element(By.CSS_SELECTOR, "section.pair")
  pair_id = pair.get_attribute("data-pair-id")
  choice_a = pair.find_element(By.CSS_SELECTOR, f"#pref-{pair_id}-A")
  preferred = choice_a.get_attribute("value")
  choice_a.click()
  assert d.find_element(By.ID, "progress").text == "2 of 5 answered"

  # Answers survive a reload (localStorage), and the order is the same for the same rater.
  order = [e.get_attribute("data-clip-id") for e in d.find_elements(By.CSS_SELECTOR, "#ratings .item")]
  d.refresh()
  d.find_element(By.ID, "start").click()  # the name field is prefilled with the last rater
  assert d.find_element(By.ID, "progress").text == "2 of 5 answered"
  assert [e.get_attribute("data-clip-id")
          for e in d.find_elements(By.CSS_SELECTOR, "#ratings .item")] == order
  assert d.find_element(By.ID, f"rating-{clip_id}-4").is_selected()

  d.find_element(By.ID, "download").click()
  csvs = _wait_for(lambda: [p for p in d.downloads.glob("*.csv")])
  assert len(csvs) == 1, list(d.downloads.iterdir())
  assert _severe(d) == []

  res = export.listening_results(csvs, study / "key.csv")
  key = export.read_key(study / "key.csv")
  assert res["n_raters"] == 1 and res["n_ratings"] == 1 and res["n_preferences"] == 1
  assert res["unknown_ids"] == [] and res["mismatched_pairs"] == 0
  (cond,) = res["mos"]
  assert cond == key[clip_id]["condition"] and res["mos"][cond]["mean"] == 4.0
  (p,) = res["preferences"].values()
  winner = key[preferred]["condition"]
  assert p["a_wins" if p["a"] == winner else "b_wins"] == 1 and p["n"] == 1


def test_order_differs_between_raters(study, browser):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  d = browser
  orders = set()
  for name in ("r1", "r2", "r3", "r4", "r5", "r6"):
    d.get((study / "rater" / "index.html").as_uri())
    field = d.find_element(By.ID, "rater-name")
    field.clear()
    field.send_keys(name)
    d.find_element(By.ID, "start").click()
    orders.add(tuple(e.get_attribute("data-clip-id")
                     for e in d.find_elements(By.CSS_SELECTOR, "#ratings .item")))
  # 4 rated clips have 24 orders; six raters all seeing one order would be (1/24)^5.
  assert len(orders) > 1
  assert _severe(d) == []
