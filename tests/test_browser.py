"""JupyterLab in a real browser, as a student meets it: `jupyter lab` on localhost with a token, the
`workshop` kernel registered as `make kernel` does, notebooks/01_baseline.ipynb opened in headless
Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium), Run > Run All Cells from
the menu, then: every cell ran, none shows an error, the plots rendered, and a screenshot is saved
in the test's temporary folder (its path is printed). And notebook 07's memory planner: its widget
renders, and choosing another checkpointing in its drop-down, or moving a slider, redraws the bar.

Skipped where chromium or chromedriver is missing, unless WORKSHOP_REQUIRE_BROWSER=1 (CI), which
turns the skip into a failure. `.ci/run` installs both.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

from helpers import REPO

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1500)]
NOTEBOOK = REPO / "notebooks" / "01_baseline.ipynb"
MEMORY_NOTEBOOK = REPO / "notebooks" / "07_memory.ipynb"
WIDGET = "application/vnd.jupyter.widget-view+json"
SMALLER = "num_train = 1024\nnum_test = 256\nprofile_steps = 2"
RUN_TIMEOUT_S = 1200  # the whole notebook through the browser, on two busy CPU cores
CHECK_CELL = """# In JupyterLab: progress bars, not log lines
from workshop.base import progress

print("interactive:", progress.is_interactive())
for _ in progress.progress(range(3), desc="bar check"):
    pass"""


def _tools():
    """(chromium, chromedriver) paths, or skip (fail under WORKSHOP_REQUIRE_BROWSER=1)."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        selenium = None
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver), ("selenium", selenium)) if not found]
    if missing:
        msg = (f"{' and '.join(missing)} not found: apt-get install chromium chromium-driver, "
               "pip install selenium (the dev extra)")
        if os.environ.get("WORKSHOP_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + ", and WORKSHOP_REQUIRE_BROWSER=1")
        pytest.skip(msg)
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(tmp_path, nb):
    """A JupyterLab server on a free localhost port with a token, serving a folder that holds notebook `nb`
    (an nbformat object), with Jupyter's folders in tmp_path; yields what the tests need, then stops it."""
    folder = tmp_path / "lab"
    folder.mkdir()
    nbformat.write(nb, folder / nb.metadata["file_name"])

    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLBACKEND", "WORKSHOP_PROGRESS", "WORKSHOP_LOG_EVERY", "JPY_SESSION_NAME")}
    env.update(JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_DATA_DIR=str(tmp_path / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), IPYTHONDIR=str(tmp_path / "ipython"))
    # the kernel the notebooks name, registered as `make kernel` does (--user: JUPYTER_DATA_DIR here)
    subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "workshop", "--display-name",
                    "workshop"], env=env, check=True, capture_output=True)
    # no news toast over the notebook in the screenshot
    settings = tmp_path / "config" / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))

    port, token = _free_port(), os.urandom(12).hex()
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
         *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI containers run as root
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyterlab.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "token": token, "notebook": folder / nb.metadata["file_name"], "log": tmp_path / "jupyterlab.log"}
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving a copy of notebook 01 (outputs cleared, smaller sizes injected after its parameters cell
    as papermill injects them, a check cell appended). What its cells compute at the default sizes is nbval's to
    check; here it is the interface, and a quarter of the images fills every cell's output as well."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(SMALLER, metadata={"tags": ["injected-parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    nb.metadata["file_name"] = NOTEBOOK.name
    yield from _serve(tmp_path, nb)


@pytest.fixture
def planner_lab(tmp_path):
    """JupyterLab serving notebook 07's planner alone: its parameters cell, the imports its planner cells use,
    and those cells as committed (the table, then the bar with its sliders)."""
    cells = nbformat.read(MEMORY_NOTEBOOK, as_version=4).cells
    params = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    planner = [c for c in cells if c.cell_type == "code" and c.source.startswith(("# The planner for the parameters",
                                                                                  "# The planner as a bar"))]
    assert len(planner) == 2, "notebook 07's planner cells are not where this test looks for them"
    imports = ("import matplotlib.pyplot as plt\n\nfrom workshop import dist\nfrom workshop.base import hardware\n"
               "from workshop.estimate import planner")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.source) for c in (params, *planner)])
    nb.cells.insert(1, nbformat.v4.new_code_cell(imports))
    nb.metadata.update(kernelspec={"name": "workshop", "display_name": "workshop", "language": "python"},
                       file_name="planner.ipynb")
    yield from _serve(tmp_path, nb)


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = _tools()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def _prompts(driver) -> list[str]:
    """The input prompt of every code cell: "[3]:" ran, "[*]:" running or queued, "[ ]:" not run."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt'))"
        ".map(e => e.textContent.trim())")


def _kernel_status(driver) -> str | None:
    return driver.execute_script(
        "const e = document.querySelector('.jp-Notebook-ExecutionIndicator'); return e && e.dataset.status")


def _kernel_name(driver) -> str | None:
    return driver.execute_script("const e = document.querySelector('.jp-KernelName'); return e && e.textContent.trim()")


def _menu(driver, menu: str, item: str) -> None:
    """Click a menu of the menu bar, then its item labelled `item` (as a person would)."""
    from selenium.webdriver.common.by import By

    bar = [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if e.text.strip() == menu]
    assert bar, f"no menu {menu!r} in JupyterLab's menu bar"
    bar[0].click()
    items = [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item")
             if e.find_element(By.CSS_SELECTOR, ".lm-Menu-itemLabel").text.strip() == item]
    assert items, f"no item {item!r} in the {menu} menu"
    assert items[0].get_attribute("aria-disabled") != "true", f"{menu} > {item} is disabled"
    items[0].click()


def _wait(what: str, condition, timeout: float, driver, shot) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            driver.save_screenshot(str(shot))
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; screenshot: {shot}")
        time.sleep(1)


def test_run_all_of_notebook_01_in_jupyterlab(lab, browser, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    shot = tmp_path / "jupyterlab-01_baseline.png"
    started = time.monotonic()
    browser.get(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}")
    n_code = sum(c.cell_type == "code" for c in nbformat.read(lab["notebook"], as_version=4).cells)
    # the kernel the notebook names starts by itself: no kernel dialog, the toolbar shows it, idle
    _wait("the notebook to open with the workshop kernel idle",
          lambda: len(_prompts(browser)) == n_code and _kernel_name(browser) == "workshop"
          and _kernel_status(browser) == "idle", 180, browser, shot)

    _menu(browser, "Run", "Run All Cells")
    ran = re.compile(r"^\[\d+\]:$")
    _wait("every cell to run", lambda: all(ran.match(p) for p in _prompts(browser)) and _kernel_status(browser) == "idle",
          RUN_TIMEOUT_S, browser, shot)
    elapsed = time.monotonic() - started

    # the last figure (loss and accuracy per epoch) into view, then the screenshot
    images = browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
    if images:
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", images[-1])
        time.sleep(1)
    browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\nJupyterLab screenshot: {shot}\nRun All of {NOTEBOOK.name} in the browser: {elapsed:.0f} s")

    # what the page shows: no error output, figures drawn as images
    tracebacks = [e.text[:500] for e in browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
                  if "Traceback (most recent call last)" in e.text]
    assert tracebacks == []
    assert len(images) >= 2, "the sample images and the loss/accuracy plot should be drawn"
    assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)

    # what the notebook holds, saved through the interface: every cell ran in order, no error, PNG figures
    _menu(browser, "File", "Save Notebook")

    def saved():
        cells = [c for c in nbformat.read(lab["notebook"], as_version=4).cells if c.cell_type == "code"]
        return all(c.execution_count for c in cells) and cells
    _wait("the notebook to be saved", saved, 60, browser, shot)
    cells = saved()
    assert [c.execution_count for c in cells] == list(range(1, n_code + 1))
    outputs = [o for c in cells for o in c.outputs]
    assert [o for o in outputs if o.output_type == "error"] == []
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2
    # a kernel that JupyterLab started knows a person watches: a bar, not log lines; with ipywidgets installed
    # tqdm.auto draws it as a widget, saved as a widget view beside its text
    last = cells[-1].outputs
    check = "".join(o.get("text", "") for o in last)
    bars = [o for o in last if o.output_type == "display_data" and WIDGET in o.get("data", {})]
    assert "interactive: True" in check and bars and "bar check" in bars[0]["data"]["text/plain"], last
    assert browser.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output [class*='progress']"), "no progress bar drawn"


def _bar_image(driver) -> str | None:
    """The src of the last figure on the page (the planner's bar, drawn inside the widget's output)."""
    return driver.execute_script(
        "const imgs = document.querySelectorAll('.jp-OutputArea-output img'); "
        "return imgs.length ? imgs[imgs.length - 1].getAttribute('src') : null")


def test_the_memory_planner_widget_redraws_when_a_control_changes(planner_lab, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    shot = tmp_path / "jupyterlab-planner.png"
    browser.get(f"{planner_lab['url']}/lab/tree/planner.ipynb?token={planner_lab['token']}")
    _wait("the notebook to open with the workshop kernel idle",
          lambda: len(_prompts(browser)) == 4 and _kernel_status(browser) == "idle", 180, browser, shot)
    _menu(browser, "Run", "Run All Cells")
    ran = re.compile(r"^\[\d+\]:$")
    _wait("every cell to run and the widget to draw",
          lambda: all(ran.match(p) for p in _prompts(browser)) and _kernel_status(browser) == "idle"
          and browser.find_elements(By.CSS_SELECTOR, ".widget-dropdown select"), 300, browser, shot)
    page = browser.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
    assert "Traceback (most recent call last)" not in page
    assert "fits on H100 (74.5 GiB)" in page  # the table of the parameters' configuration (full checkpointing)
    before = _bar_image(browser)
    assert before, "the planner drew no bar"

    # the checkpointing drop-down, from full to none: 70B no longer fits, and the bar is redrawn
    dropdowns = {e.find_element(By.CSS_SELECTOR, "label").text.strip(): e
                 for e in browser.find_elements(By.CSS_SELECTOR, ".widget-dropdown")}
    assert {"model", "gpu", "strategy", "checkpointing", "offload"} <= set(dropdowns), sorted(dropdowns)
    Select(dropdowns["checkpointing"].find_element(By.CSS_SELECTOR, "select")).select_by_visible_text("none")
    _wait("the bar to be redrawn", lambda: _bar_image(browser) not in (None, before), 60, browser, shot)
    # and a slider, as a person moves it with the keyboard: the micro-batch from 1 to 2, another bar again
    sliders = {e.find_element(By.CSS_SELECTOR, "label").text.strip(): e
               for e in browser.find_elements(By.CSS_SELECTOR, ".widget-slider")}
    assert {"world_size", "tp", "micro_batch", "seq_len"} <= set(sliders), sorted(sliders)
    drawn = _bar_image(browser)
    handle = sliders["micro_batch"].find_element(By.CSS_SELECTOR, ".noUi-handle")
    handle.click()
    handle.send_keys(Keys.ARROW_RIGHT)
    _wait("the micro-batch slider to move and the bar to be redrawn",
          lambda: sliders["micro_batch"].find_element(By.CSS_SELECTOR, ".widget-readout").text.strip() == "2"
          and _bar_image(browser) not in (None, drawn), 60, browser, shot)
    browser.save_screenshot(str(shot))
