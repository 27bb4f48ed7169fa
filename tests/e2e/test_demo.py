"""`mnist-vae demo` as a person and a program meet it: one real process per module (a tiny weights
file, a tiny test split, a login from the environment), its API called through gradio_client, its
page loaded in headless Chromium with every request off 127.0.0.1 blocked and recorded, and the
process stopped by SIGTERM at the end. Inside the demo process an audit hook records every
connection it opens or name it resolves beyond this machine: Gradio's analytics and version check
would show there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw

from mnist_vae import procs
from mnist_vae.config import ModelConfig
from mnist_vae.data.pictures import load_digit
from mnist_vae.demo import page as work
from mnist_vae.demo.latents import latent_model
from mnist_vae.evaluation.figures import reconstruct
from mnist_vae.models.families import build_model
from mnist_vae.models.vae import VAE
from mnist_vae.models.weights import save_model
from mnist_vae.serving.scoring import score_pixels

pytestmark = pytest.mark.slow

USER, PASSWORD = "ada", "correct-horse-7Qz"
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Written into the demo process's sys.path: an audit hook logging connections and name look-ups
# that leave this machine (sys.addaudithook sees every socket.connect and getaddrinfo).
AUDIT_HOOK = """
import os, sys
_LOG = os.environ["DEMO_AUDIT_LOG"]
_LOCAL = ("127.", "::1", "localhost", "0.0.0.0")

def _local(host):
    return host is None or isinstance(host, (bytes, int)) or str(host).startswith(_LOCAL)

def _hook(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and not _local(args[1][0]):
        line = f"connect {args[1]}"
    elif event == "socket.getaddrinfo" and not _local(args[0]):
        line = f"resolve {args[0]}"
    else:
        return
    with open(_LOG, "a") as log:
        log.write(line + "\\n")

sys.addaudithook(_hook)
"""


@dataclass
class Demo:
    url: str
    port: int
    process: subprocess.Popen
    log: Path
    audit: Path
    folder: Path
    vae: VAE
    page: work.Page  # what the server computes, computed here by the library for comparison

    def client(self, **kwargs):
        from gradio_client import Client

        out = self.folder / "downloads"
        return Client(self.url, auth=(USER, PASSWORD), verbose=False, download_files=str(out), **kwargs)


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the demo exited ({process.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _demo_env(folder: Path, **extra: str) -> dict[str, str]:
    (folder / "audit").mkdir(exist_ok=True)
    (folder / "audit" / "sitecustomize.py").write_text(AUDIT_HOOK)
    path = os.pathsep.join(p for p in (str(folder / "audit"), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "DEMO_AUDIT_LOG": str(folder / "outbound.log"),
        "GRADIO_TEMP_DIR": str(folder / "gradio"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, write_dataset) -> Iterator[Demo]:
    """`mnist-vae demo` on a tiny model, started once for the module with a login and no --host."""
    folder = tmp_path_factory.mktemp("demo")
    vae = build_model(ModelConfig(preset="mlp", hidden=(16,), latent=4), seed=0).eval()
    save_model(vae, folder / "tiny.pt")
    data = write_dataset(folder / "mnist.npz", 16, n_test=64)
    port = procs.free_port()
    env = _demo_env(folder, DEMO_LOGIN=f"{USER}:{PASSWORD}")
    command = ["mnist-vae", "demo", "--model", "tiny.pt", "--data", "mnist.npz", "--port", str(port)]
    command += ["--threads", "1", "--auth-env", "DEMO_LOGIN"]
    log = folder / "demo.log"
    with procs.Watchdog() as watchdog, open(log, "w") as out:
        process = procs.start(command, log=out, env=env, cwd=folder, watchdog=watchdog)
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_ready(url, process, log)
            page = work.open_page(latent_model(vae), data)
            yield Demo(url, port, process, log, folder / "outbound.log", folder, vae, page)
        finally:
            procs.stop_group(process.pid, process, grace=20.0)
            watchdog.forget(process.pid)


def _canvas(path: Path, stroke: list[tuple[int, int]]) -> Path:
    """A 280x280 RGBA canvas with a black stroke on white paper, as the page's sketchpad sends it."""
    picture = Image.new("RGBA", (280, 280), "white")
    ImageDraw.Draw(picture).line(stroke, fill=(0, 0, 0, 255), width=28)
    picture.save(path)
    return path


def _sketch(path: Path | None) -> dict:
    from gradio_client import handle_file

    return {"background": None, "layers": [], "composite": handle_file(str(path)) if path else None}


def _pixels(path: str, scale: int) -> np.ndarray:
    """The 28x28 (or grid) grey levels behind a picture the page enlarged ``scale`` times."""
    return np.asarray(Image.open(path).convert("L"))[::scale, ::scale]


def test_the_page_listens_on_loopback_only_when_no_host_is_given(demo: Demo) -> None:
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) == demo.port:
                listening.append(address)
    assert listening == ["0100007F"], listening  # 127.0.0.1, and nothing on IPv6


def test_a_login_is_required(demo: Demo) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    assert requests.get(f"{demo.url}config", timeout=10).status_code == 401
    with pytest.raises(AuthenticationError, match="Please login"):
        Client(demo.url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(demo.url, auth=(USER, "wrong"), verbose=False)


def test_a_drawing_gets_its_prepared_input_reconstruction_score_and_sliders(
    demo: Demo, tmp_path: Path
) -> None:
    drawn = _canvas(tmp_path / "seven.png", [(80, 50), (200, 50), (120, 235)])
    prepared, recon, score, explored, *sliders = demo.client().predict(_sketch(drawn), api_name="/drawing")
    expected = load_digit(drawn)  # what `mnist-vae reconstruct seven.png` feeds the model
    np.testing.assert_array_equal(_pixels(prepared, work.SCALE), expected)
    want = np.rint(reconstruct(demo.vae, expected[None])[0] * 255).reshape(28, 28)
    assert np.abs(_pixels(recon, work.SCALE).astype(int) - want).max() <= 1
    neg_elbo = float(score_pixels(demo.vae, expected.reshape(1, 784), seed=0)["neg_elbo"][0])
    assert demo.page.test is not None
    share = work.percentile(demo.page.test.scores, neg_elbo)
    assert f"**Negative ELBO: {neg_elbo:.1f} nats**" in score
    assert ("all 64 MNIST" in score) if share == 100 else (f"{int(share * 10) / 10:.1f}% of the 64" in score)
    with torch.no_grad():
        mu = demo.vae.encode(torch.from_numpy(expected.reshape(1, 784)).float() / 255.0)[0][0]
    assert sliders == [round(float(mu[d.unit].clamp(-4, 4)), 2) for d in demo.page.dims]
    np.testing.assert_array_equal(
        _pixels(explored, work.SCALE), _pixels_of(work.explore(demo.page, [mu.numpy()], sliders))
    )


def _pixels_of(image: np.ndarray) -> np.ndarray:
    return work.picture(image, scale=1)


def test_an_upload_is_prepared_as_reconstruct_prepares_it(demo: Demo, tmp_path: Path, stroke_picture) -> None:
    from gradio_client import handle_file

    picture = stroke_picture(tmp_path / "photo.jpg")
    prepared, _, score, *_ = demo.client().predict(handle_file(str(picture)), api_name="/upload")
    np.testing.assert_array_equal(_pixels(prepared, work.SCALE), load_digit(picture))
    assert "nats" in score and "MNIST test images" in score


def test_bad_inputs_get_one_clear_line_and_no_traceback(demo: Demo, tmp_path: Path) -> None:
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = demo.client()
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (280, 280), (0, 0, 0, 0)).save(blank)
    for empty in (_sketch(blank), _sketch(None)):
        prepared, recon, message, *_ = client.predict(empty, api_name="/drawing")
        assert (prepared, recon, message) == (
            None,
            None,
            "The canvas is empty: draw a digit with the brush first.",
        )
    notes = tmp_path / "notes.txt"
    notes.write_text("a shopping list, not a digit")
    white = tmp_path / "white.jpg"
    Image.new("RGB", (300, 200), "white").save(white)
    huge = tmp_path / "huge.png"
    Image.new("1", (10_000, 9_000), 1).save(huge)  # 90 M pixels in 29 KB: past Pillow's bomb limit
    cases = {
        notes: "notes.txt: not an image Pillow can read (expected PNG, JPEG, ...)",
        white: "white.jpg: no digit found (the image is one flat colour)",
        huge: "huge.png: image too large to be a picture of one digit",
    }
    for path, message in cases.items():
        with pytest.raises(AppError) as caught:
            client.predict(handle_file(str(path)), api_name="/upload")
        assert str(caught.value) == message
    with pytest.raises(AppError, match="^The first canvas is empty"):
        client.predict("two drawings", 0, 1, _sketch(None), _sketch(None), 5, api_name="/interpolate")
    with pytest.raises(AppError, match="^test digit: expected a whole number from 0 to 63, got 64"):
        client.predict("two test digits", 0, 64, _sketch(None), _sketch(None), 5, api_name="/interpolate")
    assert "Traceback" not in demo.log.read_text()


def test_the_sliders_decode_at_once_from_the_digit_shown(demo: Demo, tmp_path: Path) -> None:
    client = demo.client()
    fresh = client.predict(0.0, 0.0, 0.0, 0.0, api_name="/explore")  # no digit yet: the prior's mean
    np.testing.assert_array_equal(
        _pixels(fresh, work.SCALE), _pixels_of(work.explore(demo.page, None, [0.0] * 4))
    )
    drawn = _canvas(tmp_path / "one.png", [(140, 40), (140, 240)])
    client.predict(_sketch(drawn), api_name="/drawing")
    moved = [2.5, -1.0, 0.5, 3.0]
    explored = client.predict(*moved, api_name="/explore")
    with torch.no_grad():
        x = torch.from_numpy(load_digit(drawn).reshape(1, 784)).float() / 255.0
        code = [demo.vae.encode(x)[0][0].numpy()]
    np.testing.assert_array_equal(
        _pixels(explored, work.SCALE), _pixels_of(work.explore(demo.page, code, moved))
    )


def test_an_interpolation_between_two_test_digits_or_two_drawings(demo: Demo, tmp_path: Path) -> None:
    client = demo.client()
    strip = client.predict("two test digits", 3, 60, _sketch(None), _sketch(None), 5, api_name="/interpolate")
    ends = work.pick_test_digit(demo.page, 3), work.pick_test_digit(demo.page, 60)
    expected = work.picture(work.interpolate(demo.page, *ends, 5))
    np.testing.assert_array_equal(np.asarray(Image.open(strip).convert("L")), expected)
    first = _canvas(tmp_path / "first.png", [(140, 40), (140, 240)])
    last = _canvas(tmp_path / "last.png", [(80, 50), (200, 50), (120, 235)])
    strip = client.predict("two drawings", 0, 1, _sketch(first), _sketch(last), 7, api_name="/interpolate")
    expected = work.picture(work.interpolate(demo.page, load_digit(first), load_digit(last), 7))
    np.testing.assert_array_equal(np.asarray(Image.open(strip).convert("L")), expected)


def test_samples_from_the_prior_follow_the_seed(demo: Demo) -> None:
    client = demo.client()
    grid = client.predict(9, 3, api_name="/samples")
    expected = work.picture(work.samples(demo.page, 9, 3), columns=3, scale=3)
    np.testing.assert_array_equal(np.asarray(Image.open(grid).convert("L")), expected)
    other = client.predict(9, 4, api_name="/samples")
    assert not np.array_equal(np.asarray(Image.open(other)), np.asarray(Image.open(grid)))


def _chromium():
    """Headless Chromium that reaches nothing but 127.0.0.1 and logs every request it sends."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser = shutil.which("chromium")
    if browser is None or not CHROMEDRIVER.is_file():
        pytest.fail(
            "headless Chromium is needed: `make browser` (apt-get install chromium chromium-driver)",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1500",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        # and whatever names an address outright goes to a closed port (loopback bypasses proxies)
        "--proxy-server=http://127.0.0.1:9",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _wait(condition, timeout: float = 90.0, what: str = "the page"):
    # Generous: beside the other e2e worker on 2 cores, an upload's round trip once took over 30 s.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} did not appear within {timeout:.0f}s")


def test_the_page_in_a_browser_draws_uploads_and_stays_on_this_machine(
    demo: Demo, tmp_path: Path, stroke_picture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch a driver
    driver = _chromium()
    try:
        driver.get(demo.url)
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "input[type=password]"), what="the login form")
        driver.find_element(By.CSS_SELECTOR, "input[type=text]").send_keys(USER)
        driver.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(PASSWORD)
        driver.find_element(By.XPATH, "//button[normalize-space()='Login']").click()
        sketch = _wait(lambda: driver.find_elements(By.ID, "sketch"), what="the sketchpad")[0]
        for part in ("upload", "prepared", "reconstruction", "score", "explored"):
            assert driver.find_element(By.ID, part).is_displayed(), part
        assert len(driver.find_elements(By.CSS_SELECTOR, "input[type=range]")) == 4
        tabs = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]")]
        assert tabs == ["Your digit", "Interpolation", "Samples", "Model"]

        def picture(part: str) -> str | None:
            images = driver.find_element(By.ID, part).find_elements(By.TAG_NAME, "img")
            return images[0].get_attribute("src") if images else None

        # An upload shows its reconstruction and score.
        seven = stroke_picture(tmp_path / "seven.png")
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(seven))
        uploaded = _wait(lambda: picture("reconstruction"), what="the upload's reconstruction")
        _wait(lambda: "nats" in driver.find_element(By.ID, "score").text, what="the upload's score")
        # A stroke drawn with the brush replaces it.
        sketch.find_element(By.CSS_SELECTOR, "button[aria-label=Brush]").click()
        canvas = sketch.find_elements(By.TAG_NAME, "canvas")[-1]
        stroke = (
            ActionChains(driver, duration=20).move_to_element_with_offset(canvas, -50, -90).click_and_hold()
        )
        for x, y in [(0, -90), (50, -90), (20, 0), (-10, 90)]:
            stroke.move_to_element_with_offset(canvas, x, y)
        stroke.release().perform()
        _wait(lambda: picture("reconstruction") not in (None, uploaded), what="the drawing's reconstruction")
        assert "MNIST test images" in driver.find_element(By.ID, "score").text
        driver.save_screenshot(str(tmp_path / "demo.png"))
        driver.find_element(By.XPATH, "//button[@role='tab'][.='Model']").click()
        card = _wait(lambda: driver.find_element(By.ID, "card").text, what="the model card")
        assert "tiny.pt" in card and "mlp" in card and "no registry entry" in card

        sent = [
            json.loads(entry["message"])["message"]["params"]["request"]["url"]
            for entry in driver.get_log("performance")
            if '"Network.requestWillBeSent"' in entry["message"]
        ]
    finally:
        driver.quit()
    assert any(url.startswith(f"{demo.url}assets/") for url in sent), sent[:5]
    away = [url for url in sent if not url.startswith((demo.url, "data:", "blob:"))]
    assert not away, f"the page asked beyond {demo.url}: {away}"


def test_the_cli_refuses_what_a_person_can_fix_in_one_line(demo: Demo, tmp_path: Path) -> None:
    env = _demo_env(tmp_path, DEMO_LOGIN="no-colon-in-this-secret")
    cases = [
        (["--model", "missing.pt"], "error: missing.pt: no such model file"),
        (["--model", "x.pt", "--port", str(demo.port)], f"error: cannot listen on 127.0.0.1:{demo.port}"),
        (
            ["--model", "x.pt", "--auth-env", "DEMO_LOGIN"],
            "error: --auth-env DEMO_LOGIN: expected $DEMO_LOGIN",
        ),
        (
            ["--model", "x.pt", "--auth-env", "UNSET_VAR"],
            "error: --auth-env UNSET_VAR: $UNSET_VAR is not set",
        ),
    ]
    for args, expected in cases:
        port = [] if "--port" in args else ["--port", str(procs.free_port())]
        result = subprocess.run(
            ["mnist-vae", "demo", *args, *port],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith(expected) and result.stderr.count("\n") == 1, result.stderr
        assert "no-colon-in-this-secret" not in result.stdout + result.stderr


def test_ctrl_c_stops_a_demo_without_test_digits(demo: Demo, tmp_path: Path) -> None:
    """A second process, since stopping is what it tests (the module's own one is stopped last, by
    SIGTERM): started without a data file (the log says so), then SIGINT, as Ctrl-C sends it."""
    shutil.copy(demo.folder / "tiny.pt", tmp_path / "tiny.pt")
    port = procs.free_port()
    log = tmp_path / "demo.log"
    command = [
        "mnist-vae",
        "demo",
        "--model",
        "tiny.pt",
        "--data",
        "none.npz",
        "--port",
        str(port),
        "--threads",
        "1",
    ]
    with open(log, "w") as out:
        process = procs.start(command, log=out, env=_demo_env(tmp_path), cwd=tmp_path)
        try:
            _wait_ready(f"http://127.0.0.1:{port}/", process, log)
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=30) == 0
        finally:
            procs.kill_group(process.pid, process)
    text = log.read_text()
    assert "no test digits to rank scores among: none.npz: dataset file is missing" in text
    assert text.rstrip().endswith("demo stopped") and "Traceback" not in text, text


def test_sigterm_stops_it_cleanly_having_sent_nothing_away_nor_printed_the_password(demo: Demo) -> None:
    """Last in the module: it stops the module's process."""
    demo.process.send_signal(signal.SIGTERM)
    assert demo.process.wait(timeout=30) == 0
    text = demo.log.read_text()
    assert text.rstrip().endswith("demo stopped") and "Traceback" not in text, text
    assert "(login required)" in text and PASSWORD not in text
    assert not demo.audit.exists(), demo.audit.read_text()
