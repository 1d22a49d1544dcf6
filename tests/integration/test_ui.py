"""`adiff ui` serves the store on 127.0.0.1; headless Chromium renders an explain run's page and its slice review."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from cli_support import runner, ui_server
from mlflow.tracking import MlflowClient

from anomaly_diffusion.cli import app
from anomaly_diffusion.tracking import tracked_run
from anomaly_diffusion.usecases.explain import REVIEW_KEYS

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
]


def test_ui_serves_the_store_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with tracked_run(uri, "anomaly_diffusion", "a-run", "train") as run:
        run.log_metrics({"ddpm_loss": 0.5}, 1)
    printed: list[str] = []
    with ui_server(uri, printed=printed) as url:
        query = f"{url}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=anomaly_diffusion"
        with urllib.request.urlopen(query, timeout=10) as response:
            experiment = json.loads(response.read())["experiment"]
    assert experiment["name"] == "anomaly_diffusion"
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    # it sends people to the experiment's runs in the model-training view (MLflow 3.17 opens GenAI otherwise)
    assert f"{url}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning" in printed[0]


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("Chromium is missing in CI: .ci/run must install Debian's chromium package")
    return found


def _dump_dom(browser: str, url: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _above(fd: int, lowest: int) -> int:
    """The same pipe end as a file descriptor numbered >= lowest (the original is closed)."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return moved


class DevTools:
    """Headless Chromium driven over `--remote-debugging-pipe` (commands on its fd 3, answers on fd 4,
    NUL-terminated JSON): for pages that render later than `--dump-dom`'s virtual time allows on a
    loaded machine, and for pressing keys. Use as a context manager."""

    def __init__(self, browser: str) -> None:
        self._profile = tempfile.TemporaryDirectory()
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()
        # above 4, so that the shell's redirections onto 3 and 4 cannot clobber them
        to_browser, from_browser = (_above(fd, 10) for fd in (to_browser, from_browser))
        flags = [f for f in CHROMIUM_FLAGS if not f.startswith("--virtual-time-budget")]
        shell = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        self._process = subprocess.Popen(
            ["bash", "-c", shell, browser, *flags, f"--user-data-dir={self._profile.name}", "--remote-debugging-pipe"],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _call(self, method: str, session: str | None = None, **params: object) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._answers, 1 << 20)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                assert "error" not in answer, answer["error"]
                return answer["result"]

    def open(self, url: str) -> None:
        self._call("Page.navigate", self._session, url=url)

    def js(self, expression: str) -> object:
        result = self._call("Runtime.evaluate", self._session, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120.0) -> object:
        """Poll a JavaScript expression until it is truthy (in real time); its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"not true within {timeout:.0f} s: {expression}")

    def press(self, key: str, code: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self._call(
                "Input.dispatchKeyEvent", self._session, type=kind, key=key, code=key, windowsVirtualKeyCode=code
            )

    def __enter__(self) -> DevTools:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        self._process.wait(timeout=30)
        os.close(self._commands)
        os.close(self._answers)
        self._profile.cleanup()


def test_explain_run_page_in_headless_chromium(
    tmp_path: Path, tiny_dataset: Path, bundle: Path, tracking_uri: str
) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); CI installs it and runs this test")
    result = runner.invoke(
        app,
        [
            "explain",
            str(tiny_dataset.parent / "s5_t1.nii.gz"),
            "--checkpoint",
            str(bundle),
            "--out",
            str(tmp_path / "explain"),
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("anomaly_diffusion")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "explain-s5_t1"]
    steps = sorted(
        int(m["step"])
        for a in client.list_artifacts(run.info.run_id, "images")
        if (m := re.search(r"\+step\+(?P<step>\d+)\+", a.path)) and "review~3_map" in a.path
    )
    assert steps
    printed: list[str] = []
    with ui_server(tracking_uri, printed=printed) as url:
        landing = _dump_dom(browser, re.search(r"http://\S+", printed[0]).group(0))  # type: ignore[union-attr]
        assert "explain-s5_t1" in landing and "Evaluation runs" not in landing  # the model-training runs list
        page = f"{url}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
        overview = _dump_dom(browser, page)
        assert "explain-s5_t1" in overview
        assert "p_healthy_before_mean" in overview and "anomaly_volume_ml" in overview
        # the description, where a reviewer lands, points to the slice review and shows the montage
        assert "Slice review" in overview
        assert 'src="get-artifact?path=explain/s5_t1_montage.png' in overview
        artifacts = _dump_dom(browser, f"{page}/artifacts/explain/s5_t1_montage.png")
        assert '<img alt="explain/s5_t1_montage.png"' in artifacts  # the PNG preview is rendered
        # the Model metrics tab: a "review" section, one image chart per view, each with a step slider over
        # the explained slices, that shows the slice of the step it is moved to (MLflow 3.17 opens it at step 0)
        with DevTools(browser) as chrome:
            chrome.open(f"{page}/model-metrics?workflowType=machine_learning")
            sliders = "document.querySelectorAll('[role=slider]')"
            chrome.wait_for(f"{sliders}.length >= {len(REVIEW_KEYS)}")
            text = str(chrome.js("document.body.innerText"))
            assert re.search(r"review\s*\(3\)", text) and all(key in text for key in REVIEW_KEYS)
            ranges = chrome.js(f"Array.from({sliders}).map(s => [s.ariaValueMin, s.ariaValueMax].map(Number))")
            assert ranges[: len(REVIEW_KEYS)] == [[steps[0], steps[-1]]] * len(REVIEW_KEYS)  # type: ignore[index]

            def shown(step: int) -> str:  # JavaScript: is the map's image of that step on the page?
                name = f"review~3_map+step+{step}+"
                return f"Array.from(document.images).some(i => decodeURIComponent(i.src).includes('{name}'))"

            if steps[0] == 0:  # the charts open at step 0: a slice 0 shows at once, another waits for the slider
                chrome.wait_for(shown(0), timeout=60)
            else:
                assert not chrome.js(shown(steps[0]))
            after = next(step for step in steps if step > 0)  # an arrow key moves to the next logged step
            chrome.js(f"{sliders}[2].focus()")
            chrome.press("ArrowRight", 39)
            assert chrome.wait_for(f"{sliders}[2].ariaValueNow == '{after}' && {shown(after)}", timeout=60)


def test_ui_stopped_by_sigterm_stops_serving(tmp_path: Path) -> None:
    """SIGTERM to `adiff ui` alone (as a service manager sends it) ends mlflow's server and workers too."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with tracked_run(uri, "anomaly_diffusion", "a-run", "train"):
        pass
    with ui_server(uri, stop_signal=signal.SIGTERM, whole_group=False) as url:
        pass
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                time.sleep(0.5)
        except OSError:
            break
    else:
        raise AssertionError(f"{url} still answers after adiff ui got SIGTERM")
