"""The feedback studio (rlft/studio): the loop through its Python functions, its session as a run
directory, its errors, and the page in a real headless browser (Debian's chromium driven by
playwright; `make install-browser`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_port, run_process, subprocess_env, timeout_s

pytest.importorskip("gradio", reason="the studio's extra is not installed: pip install 'rlft[studio]'")

# the toy world, PXPO on one painted image (experiment=pxpo_feedback), no progress bars
QUIET = ["trainer.progress_bar=false"]
PROMPT, PICK, EPOCHS = "a red circle", 2, 12  # candidate 2: seed 2
ARTIFACTS = Path(os.environ.get("RLFT_TEST_ARTIFACTS", REPO / "outputs" / "test_artifacts"))


def halves(size: tuple[int, int]) -> np.ndarray:
    """The browser test's painting as a map: the left half liked (255), the right half disliked (0)."""
    H, W = size
    m = np.full((H, W), 128, dtype=np.uint8)
    m[:, : W // 2], m[:, W // 2 :] = 255, 0
    return m


@pytest.fixture(scope="module")
def studio_env(cache_dir):
    """The test environment (offline, the test cache) in this process, for Studio objects built here."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in subprocess_env(cache_dir).items() if k != "PYTHONPATH"})
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_strokes_become_a_feedback_map_and_the_change_is_measured_per_region():
    """Green strokes are liked (255), red ones disliked (0), the rest neutral (128); a later layer wins.
    The region change is the mean |after - before| (0-255) over each region's pixels, hand-computed."""
    from rlft.studio import region_change, strokes_to_map

    layer = np.zeros((4, 6, 4), dtype=np.uint8)
    layer[:, :2] = (0, 200, 0, 255)  # like
    layer[:, 4:] = (224, 0, 0, 255)  # dislike
    over = np.zeros((4, 6, 4), dtype=np.uint8)
    over[0, 0] = (224, 0, 0, 128)  # a half-transparent dislike stroke over a liked pixel
    m = strokes_to_map([layer, over])
    assert m.dtype == np.uint8 and m.shape == (4, 6)
    assert (m[1:, :2] == 255).all() and m[0, 0] == 0 and (m[:, 2:4] == 128).all() and (m[:, 4:] == 0).all()
    assert (strokes_to_map([], (3, 3)) == 128).all()

    before = np.zeros((4, 6, 3), dtype=np.uint8)
    after = before.copy()
    after[:, :2] = (30, 0, 0)  # liked pixels: |change| averaged over channels = 10
    after[:, 4:] = (60, 60, 60)  # disliked: 60
    out = region_change(before, after, m)
    # liked: 7 pixels at 10 (m[0, 0] is disliked now); disliked: 8 pixels at 60 and m[0, 0] at 10
    assert out["liked_pixels"] == 7 and out["disliked_pixels"] == 9
    assert out["liked_change"] == pytest.approx(10.0)
    assert out["disliked_change"] == pytest.approx((8 * 60 + 10) / 9)


def test_the_loop_through_python_functions_is_deterministic_and_a_run_directory(studio_env, tmp_path, cache_dir):
    """generate -> pick -> train -> undo -> train through the functions the page calls. The candidate is
    the image the run's first epoch draws; a round's numbers repeat exactly in a second studio; undo
    removes the round's checkpoint, map and image; the session continues with `python -m rlft` (the
    command in studio.json) and exports with `python -m rlft.export`."""
    from rlft.studio import SESSION_FILE, Studio

    studio = Studio(QUIET, root=tmp_path / "a")
    candidates = studio.generate(PROMPT, n=PICK + 1)
    assert len(candidates) == PICK + 1 and candidates[0].shape == (*studio.image_size, 3)
    assert not np.array_equal(candidates[0], candidates[1])  # fixed noise per seed, different seeds
    original = studio.pick(PICK)
    feedback = halves(studio.display_size)
    first = studio.train(feedback, epochs=EPOCHS)
    assert first.round == 1 and first.epochs == EPOCHS
    assert (studio.dir / "checkpoints" / f"epoch_{EPOCHS:05d}").is_dir()
    assert not np.array_equal(studio.current, original)  # the image moved

    again = Studio(QUIET, root=tmp_path / "b")  # the same session from scratch: the same numbers
    again.generate(PROMPT, n=PICK + 1)
    assert np.array_equal(again.pick(PICK), original)
    repeat = again.train(feedback, epochs=EPOCHS)
    assert (repeat.liked_change, repeat.disliked_change) == (first.liked_change, first.disliked_change)

    second = studio.train(feedback, epochs=4)
    assert second.epochs == EPOCHS + 4
    studio.undo()
    assert [r.round for r in studio.session.rounds] == [1]
    assert not (studio.dir / "checkpoints" / f"epoch_{EPOCHS + 4:05d}").exists()
    assert not (studio.dir / second.map).exists() and np.array_equal(studio.current, again.current)

    saved = json.loads((studio.save() / SESSION_FILE).read_text())
    assert saved["prompt"] == PROMPT and saved["seed"] == PICK and len(saved["rounds"]) == 1
    reopened = Studio.open(studio.dir)
    assert np.array_equal(reopened.current, studio.current) and reopened.session.rounds == studio.session.rounds
    from rlft.studio.page import build_page

    build_page(reopened)  # `python -m rlft.studio --session DIR`: the page opens on the session's image

    # the session is a run: the saved command continues it (2 epochs more) and the export loads
    resume = saved["commands"]["resume"].split()[3:]  # after "python -m rlft"
    resume = [a for a in resume if not a.startswith("trainer.epochs=")] + [f"trainer.epochs={EPOCHS + 2}"]
    proc = run_process([sys.executable, "-m", "rlft", *QUIET, *resume], cache_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {studio.dir / 'checkpoints' / f'epoch_{EPOCHS:05d}'}" in proc.stdout
    assert (studio.dir / "checkpoints" / f"epoch_{EPOCHS + 2:05d}").is_dir()
    out = tmp_path / "export"
    proc = run_process([sys.executable, "-m", "rlft.export", str(studio.dir), str(out)], cache_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "rlft_export.json").read_text())["kind"] == "full"


def test_bad_input_is_one_clear_message_and_loses_nothing(studio_env, tmp_path):
    """Training before a pick, an empty map, a map of the wrong size, undo with no round, an empty
    prompt, a bad override and a model that cannot load: each one RlftError line; a session's files
    are as they were."""
    from rlft.errors import RlftError
    from rlft.studio import Studio, StudioError

    studio = Studio(QUIET, root=tmp_path)
    with pytest.raises(StudioError, match="no sample picked"):
        studio.train(halves(studio.display_size))
    with pytest.raises(StudioError, match="no samples yet"):
        studio.pick(0)
    with pytest.raises(StudioError, match="the prompt is empty"):
        studio.generate("   ")
    studio.generate(PROMPT, n=1)
    with pytest.raises(StudioError, match="there is no sample 3"):
        studio.pick(3)
    studio.pick(0)
    files = sorted(p.relative_to(studio.dir) for p in studio.dir.rglob("*"))
    with pytest.raises(StudioError, match="the map is empty"):
        studio.train(np.full(studio.display_size, 128, dtype=np.uint8))
    with pytest.raises(StudioError, match=r"the map is 10x10, the sample is shown at"):
        studio.train(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(StudioError, match="nothing to undo"):
        studio.undo()
    assert sorted(p.relative_to(studio.dir) for p in studio.dir.rglob("*")) == files
    with pytest.raises(RlftError, match="overrides"):
        Studio(["no_such_key=1"], root=tmp_path)
    with pytest.raises(RlftError, match="model.path"):
        Studio(["model.path=/nonexistent/model"], root=tmp_path)


def test_without_gradio_the_studio_names_its_extra(cache_dir):
    """`python -m rlft.studio` where Gradio cannot be imported: one line naming the extra to install."""
    code = "import sys; sys.modules['gradio'] = None; from rlft.studio.__main__ import main; main([])"
    proc = run_process([sys.executable, "-c", code], cache_dir, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "rlft: error: the studio needs Gradio, an optional extra: pip install 'rlft[studio]'"


def _browser() -> str | None:
    """Debian's chromium (make install-browser), or None."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture
def studio_server(tmp_path, cache_dir):
    """`python -m rlft.studio` on a free port of 127.0.0.1, sessions under tmp_path; its URL and root."""
    port = free_port()
    cmd = [sys.executable, "-m", "rlft.studio", *QUIET, f"paths.output_root={tmp_path}", "--port", str(port)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    env = subprocess_env(cache_dir, {"GRADIO_ANALYTICS_ENABLED": "False"})
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s(120)
    import urllib.request

    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the studio did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
                time.sleep(1)
        yield url, tmp_path / "studio"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _paint_half(page, canvas: dict, side: str, rows: int = 8) -> None:
    """Horizontal brush strokes over one half of the sample, from near the middle outwards. The sample
    is centred on the editor's canvas and no larger than its height, so strokes that reach half that
    height from the middle cover its half (beyond it they are cut off) and stay clear of the tool bar
    at the canvas's left edge; the brush's radius (1/16 of the sample, scaled to the canvas) is kept
    clear of the middle."""
    mid, reach = canvas["x"] + canvas["width"] / 2, canvas["height"] / 2
    sign = -1 if side == "left" else 1
    x0, x1 = mid + sign * 28, mid + sign * reach
    for r in range(rows + 1):
        y = canvas["y"] + 2 + r * (canvas["height"] - 4) / rows
        page.mouse.move(x0, y)
        page.mouse.down()
        page.mouse.move(x1, y)  # one move event a stroke: each event redraws the editor (~0.25 s)
        page.mouse.up()


def test_the_page_in_a_real_browser(studio_server, tmp_path, studio_env):
    """Open the page, generate, click a sample, paint the left half liked (green) and the right half
    disliked (red), train, and read the page's own account: the disliked half changed more than the
    liked half (pixel change from the same noise). The same session through the Python functions (the
    map the page saved) gives the same numbers. The screenshot is kept (RLFT_TEST_ARTIFACTS)."""
    browser_path = _browser()
    if browser_path is None:
        pytest.skip("no chromium: `make install-browser` installs Debian's (the studio's browser test needs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is part of rlft[dev]")
    url, root = studio_server
    limit_ms = timeout_s(300) * 1000
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(limit_ms)
        page.goto(url)
        page.fill("#studio-prompt textarea", PROMPT)
        page.locator("#studio-generate").click()
        page.wait_for_selector("#studio-gallery img")
        page.locator("#studio-gallery img").nth(PICK).click()
        page.wait_for_function("document.querySelector('#studio-status').innerText.includes('session')")
        editor = page.locator("#studio-editor")
        page.wait_for_timeout(1000)  # the sample drawn on the canvas
        canvas = editor.locator("canvas").first.bounding_box()
        editor.get_by_role("button", name="Brush", exact=True).click()
        _paint_half(page, canvas, "left")  # the like brush (the first colour)
        editor.get_by_role("button", name="Color").click()
        editor.locator("menu.swatch button.color").nth(1).click()  # the dislike brush
        _paint_half(page, canvas, "right")
        page.locator("#studio-train").click()
        page.wait_for_function("document.querySelector('#studio-change').innerText.includes('liked')")
        line = page.locator("#studio-change").inner_text()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "studio.png"), full_page=True)
        browser.close()
    liked, disliked = (float(v) for v in re.findall(r"(?:liked|disliked) ([0-9.]+) over", line))
    assert disliked > liked, line

    # the same session without the browser: the page's map, prompt and seed give the same numbers
    from rlft.studio import SESSION_FILE, Studio

    (session,) = root.iterdir()
    saved = json.loads((session / SESSION_FILE).read_text())
    (played,) = saved["rounds"]
    from PIL import Image

    feedback = np.asarray(Image.open(session / played["map"]))
    assert (feedback[:, : feedback.shape[1] // 3] == 255).mean() > 0.5  # the page's strokes, as painted
    assert (feedback[:, -feedback.shape[1] // 3 :] == 0).mean() > 0.5
    studio = Studio(QUIET, root=tmp_path / "replay")
    studio.generate(PROMPT, n=saved["seed"] + 1)
    studio.pick(saved["seed"])
    replay = studio.train(feedback, epochs=played["epochs"])
    assert f"liked {replay.liked_change:.2f}" in line and f"disliked {replay.disliked_change:.2f}" in line
