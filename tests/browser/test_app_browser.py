"""The web demo in a real browser: upload, prompt, submit, and check what the page shows against the model's own
`segment` (pixel checks read the page's <img> and <video> through a canvas), for `maskcma app` and for the Space
folder of `maskcma export --space` started from a venv without this package. Every request the page makes must stay
on 127.0.0.1 (no fonts, scripts or analytics from the Internet).

Screenshots are written to `MASKCMA_APP_SCREENSHOTS` when set (`docs/app/` holds the committed ones)."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import pytest
from app_fixtures import IMAGE_PROMPT, build_app_model, decode_video, reference_segment, save_app_model
from browser_support import (
    CHROMIUM_FLAGS,
    ensure_space_venv,
    free_port,
    server_env,
    start_server,
    stop_server,
)
from PIL import Image

from transformers_maskcma.app import ui
from transformers_maskcma.app.examples import VIDEO_FPS, VIDEO_FRAMES, VIDEO_PROMPT, write_examples
from transformers_maskcma.cli import main
from transformers_maskcma.processing.samples import ASSETS_DIR
from transformers_maskcma.processing.visualize import overlay_masks

pytestmark = pytest.mark.browser

SHAPES = ASSETS_DIR / "shapes.png"
TIMEOUT_MS = 180_000  # one model call on a busy 2-core machine, generously

READ_IMAGE_JS = """async (selector) => {
  const img = document.querySelector(selector);
  if (!img.complete) { await new Promise((resolve) => img.addEventListener('load', resolve, {once: true})); }
  const canvas = document.createElement('canvas');
  canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let binary = '';
  for (let i = 0; i < data.length; i++) binary += String.fromCharCode(data[i]);
  return {width: canvas.width, height: canvas.height, rgba: btoa(binary), src: img.src};
}"""

PLAY_AND_READ_VIDEO_JS = """async ({selector, time}) => {
  const video = document.querySelector(selector);
  video.muted = true;
  if (video.readyState < 1) {
    await new Promise((resolve) => video.addEventListener('loadedmetadata', resolve, {once: true}));
  }
  const duration = video.duration;
  await video.play();
  const start = performance.now();
  while (video.currentTime === 0 && performance.now() - start < 20000) { await new Promise((r) => setTimeout(r, 50)); }
  const played = video.currentTime;
  video.pause();
  await new Promise((resolve) => {
    video.addEventListener('seeked', resolve, {once: true});
    video.currentTime = time;
  });
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const context = canvas.getContext('2d');
  context.drawImage(video, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let binary = '';
  for (let i = 0; i < data.length; i++) binary += String.fromCharCode(data[i]);
  return {duration, played, width: canvas.width, height: canvas.height, rgba: btoa(binary), src: video.currentSrc};
}"""


def rgb(reading: dict) -> np.ndarray:
    array = np.frombuffer(base64.b64decode(reading["rgba"]), dtype=np.uint8)
    return array.reshape(reading["height"], reading["width"], 4)[..., :3]


def block_error(a: np.ndarray, b: np.ndarray, size: int = 4) -> float:
    def blocks(x):
        x = x.astype(np.float64)[: x.shape[0] // size * size, : x.shape[1] // size * size]
        return x.reshape(x.shape[0] // size, size, x.shape[1] // size, size, 3).mean(axis=(1, 3))

    return float(np.abs(blocks(a) - blocks(b)).mean())


# -- fixtures: the model, the two servers, the browser -------------------------------------------------------------


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    save_app_model(root / "model")
    return root


@pytest.fixture(scope="module")
def reference():
    """The served model's own outputs, computed in this process: image, video and γ = 0 masks."""
    model, processor = build_app_model()
    zeroed, _ = build_app_model(gamma=0.0)
    image = Image.open(SHAPES).convert("RGB")
    examples = write_examples(Path(tempfile.mkdtemp(prefix="maskcma-browser-examples-")))
    frames, _ = decode_video(examples / "moving_circle.webm")
    return {
        "image": image,
        "image_masks": reference_segment(model, processor, image, IMAGE_PROMPT)[1],
        "zero_gamma_masks": reference_segment(zeroed, processor, image, IMAGE_PROMPT)[1],
        "video": examples / "moving_circle.webm",
        "frames": frames,
        "video_masks": reference_segment(model, processor, frames, VIDEO_PROMPT)[1],
        "routed_tokens": ui.MaskCMADemo(model, processor).compare_cma(SHAPES, IMAGE_PROMPT).routed_tokens[0],
    }


@pytest.fixture(scope="module", params=["package", "space"])
def server(request, model_root):
    """`(url, kind)` of a running app: `maskcma app` from this package, or the exported Space from a fresh venv."""
    port = free_port()
    run_dir = model_root / f"run-{request.param}"
    run_dir.mkdir()
    env = server_env(run_dir)
    if request.param == "package":
        command = [sys.executable, "-m", "transformers_maskcma.cli", "app", "--model", str(model_root / "model"),
                   "--port", str(port), "--threads", "1"]  # fmt: skip
    else:
        export, space = model_root / "export", model_root / "space"
        if not space.exists():
            assert main(["export", "--model", str(model_root / "model"), "--output", str(export), "--repo-id",
                         "alice/maskcma-tiny", "--space", str(space)]) == 0  # fmt: skip
        python = ensure_space_venv(space / "requirements.txt")
        check = subprocess.run([str(python), "-c", "import transformers_maskcma"], capture_output=True, text=True)
        assert "No module named 'transformers_maskcma'" in check.stderr, "the Space venv must not have this package"
        env["MASKCMA_MODEL"] = str(export)
        command = [str(python), str(space / "app.py"), "--host", "127.0.0.1", "--port", str(port)]
    process = start_server(command, env, run_dir / "server.log", port)
    yield f"http://127.0.0.1:{port}/", request.param
    stop_server(process)


@pytest.fixture(scope="module")
def browser(chromium_path, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),  # a fresh --user-data-dir
            executable_path=chromium_path,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 1000},
        )
        requests: list[str] = []
        context.on("request", lambda request: requests.append(request.url))
        yield context, requests
        context.close()


@pytest.fixture
def page(browser, server):
    context, requests = browser
    url, kind = server
    requests.clear()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#run-button")
    yield page, kind
    off_machine = sorted({r for r in requests if urlparse(r).scheme in ("http", "https", "ws", "wss")
                          and urlparse(r).hostname != "127.0.0.1"})  # fmt: skip
    page.close()
    assert off_machine == [], f"the page fetched from outside 127.0.0.1: {off_machine}"
    assert requests, "no request was recorded: the recorder is not working"


def screenshot(page, name: str, kind: str) -> None:
    folder = os.environ.get("MASKCMA_APP_SCREENSHOTS")
    if folder and kind == "package":
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"), full_page=False)


def submit(page, media_selector: str, path: Path, prompt: str) -> None:
    page.locator(f"{media_selector} input[type=file]").set_input_files(str(path))
    page.locator("#prompt-input textarea").fill(prompt)
    page.locator("#run-button").click()


# -- the tests -----------------------------------------------------------------------------------------------------


def test_image_overlay_in_the_page_shows_the_models_mask(page, reference):
    page, kind = page
    submit(page, "#image-input", SHAPES, IMAGE_PROMPT)
    page.wait_for_function("() => document.querySelector('#answer-output textarea').value.length > 0")
    assert page.locator("#answer-output textarea").input_value() == "Sure, [SEG]."
    page.wait_for_selector("#overlay-output img")
    shown = rgb(page.evaluate(READ_IMAGE_JS, "#overlay-output img"))
    masks = reference["image_masks"]
    assert masks.shape == (1, 128, 192) and masks.sum() > 0
    # the pixels the overlay changed are exactly the model's mask, and they hold exactly the overlay's colours
    changed = (shown != np.asarray(reference["image"])).any(-1)
    np.testing.assert_array_equal(changed, masks[0])
    np.testing.assert_array_equal(shown, np.asarray(overlay_masks(reference["image"], list(masks))))
    page.wait_for_selector("#mask-files a")
    link = page.locator("#mask-files a").first.get_attribute("href")
    assert urlparse(link).path.endswith("/mask_1.png")
    downloaded = Image.open(io.BytesIO(page.request.get(urljoin(page.url, link)).body()))
    np.testing.assert_array_equal(np.asarray(downloaded) > 0, masks[0])
    assert "#ff3838" in page.locator("#scores-output").inner_text()
    assert page.locator("#timing-output").inner_text().startswith("Took ")
    screenshot(page, "segment_image", kind)


def test_a_too_long_prompt_is_one_line_in_the_page(page):
    page, kind = page
    submit(page, "#image-input", SHAPES, "x" * 501)
    toast = page.get_by_text("The prompt has 501 characters; this demo takes at most 500. Shorten it.")
    toast.wait_for()
    assert "Traceback" not in page.content()


def test_video_overlay_plays_in_the_page_and_shows_the_models_masks(page, reference):
    page, kind = page
    submit(page, "#video-input", reference["video"], VIDEO_PROMPT)
    page.wait_for_selector("#video-output video[src]")
    reading = page.evaluate(PLAY_AND_READ_VIDEO_JS, {"selector": "#video-output video", "time": 0.25 / VIDEO_FPS})
    assert reading["src"].endswith(".webm")
    assert reading["duration"] == pytest.approx(VIDEO_FRAMES / VIDEO_FPS, abs=0.5 / VIDEO_FPS)
    assert reading["played"] > 0  # the browser played it
    assert (reading["width"], reading["height"]) == (192, 128)
    frame = rgb(reading)
    masks = reference["video_masks"]
    assert masks[0, 0].sum() > 0
    expected = np.asarray(overlay_masks(Image.fromarray(reference["frames"][0]), [masks[0, 0]]))
    error = block_error(frame, expected)
    assert error < 6.0 and error < 0.5 * block_error(frame, reference["frames"][0])
    link = page.locator("#mask-files a").first.get_attribute("href")
    assert urlparse(link).path.endswith("/masks_object_1.zip")
    assert "video of 12 frames" in page.locator("#timing-output").inner_text()
    screenshot(page, "segment_video", kind)


def test_cma_comparison_in_the_page(page, reference):
    page, kind = page
    page.get_by_role("tab", name="CMA comparison").click()
    page.locator("#compare-input input[type=file]").set_input_files(str(SHAPES))
    page.locator("#compare-prompt textarea").fill(IMAGE_PROMPT)
    page.locator("#compare-button").click()
    page.get_by_text("pixels differ").wait_for()
    on, off = reference["image_masks"][0], reference["zero_gamma_masks"][0]
    assert (on != off).sum() > 0
    np.testing.assert_array_equal(
        rgb(page.evaluate(READ_IMAGE_JS, "#with-cma img")), np.asarray(overlay_masks(reference["image"], [on]))
    )
    np.testing.assert_array_equal(
        rgb(page.evaluate(READ_IMAGE_JS, "#without-cma img")), np.asarray(overlay_masks(reference["image"], [off]))
    )
    difference = rgb(page.evaluate(READ_IMAGE_JS, "#difference img"))
    np.testing.assert_array_equal((difference == ui.ONLY_WITH_CMA).all(-1), on & ~off)
    np.testing.assert_array_equal((difference == ui.ONLY_WITHOUT_CMA).all(-1), off & ~on)
    summary = page.locator("#compare-summary").inner_text()
    assert f"{int((on != off).sum()):,} pixels differ" in summary
    for token in reference["routed_tokens"]:
        assert f"{token.token} ({token.probability:.2f})" in summary
    screenshot(page, "cma_comparison", kind)
