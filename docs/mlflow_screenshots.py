"""Screenshots of a pipeline run in the MLflow UI, for docs/mlflow.md: the experiment's
runs table, the parent run, stage 3's metric charts and generate's audio.

    .venv/bin/python docs/mlflow_screenshots.py --run runs/demo [--out docs/img]

Starts `mlflow ui` on a free loopback port over the run's store and drives headless
Chromium (`apt-get install chromium`) over its DevTools pipe: the UI is put in its
"Model training" view with the assistant panel closed and a few headline columns chosen,
as a researcher would set it once; each page is stored as a small 256-colour PNG.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

MLFLOW = Path(sys.executable).parent / "mlflow"
WIDTH, HEIGHT = 1500, 950
# the runs table's columns: headline params, each stage's results, evaluation, audit
# (stage 3's best val loss is often its first epoch, D pre-training: its last one says more)
WIDTHS = {"tags.`sweep.point`": 130, "params.`stage3.lr`": 80,
          "metrics.`stage1/best_val_loss`": 125, "metrics.`stage3/last_val_loss`": 125,
          "metrics.`eval/frechet_ratio`": 115, "metrics.`eval/diversity_ratio`": 120,
          "tags.`audit.verdict`": 100}
COLUMNS = list(WIDTHS)


class Browser:
    """Headless Chromium driven over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, profile: Path):
        to_chrome, from_chrome = os.pipe(), os.pipe()

        def child_fds() -> None:
            os.dup2(to_chrome[0], 3)
            os.dup2(from_chrome[1], 4)
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise SystemExit("chromium not found (apt-get install -y chromium)")
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=child_fds,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome[0])
        os.close(from_chrome[1])
        self._out, self._in = to_chrome[1], from_chrome[0]
        self._id, self._buffer, self._session = 0, b"", None
        page = next(t for t in self.call("Target.getTargets")["targetInfos"]
                    if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                  flatten=True)["sessionId"]
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict:
        """One DevTools command; its result."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self._session:
            message["sessionId"] = self._session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def run_js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def open(self, url: str, settle_s: float = 8.0) -> None:
        self.call("Page.navigate", url=url)
        time.sleep(settle_s)

    def type_into(self, placeholder: str, text: str) -> None:
        """Type `text` into the input showing `placeholder` (as React sees typing)."""
        self.run_js(
            f"const box = document.querySelector('input[placeholder=\"{placeholder}\"]');"
            "Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value')"
            f".set.call(box, {json.dumps(text)});"
            "box.dispatchEvent(new Event('input', {bubbles: true}));")
        time.sleep(3)

    def screenshot(self, out: Path, height: int = HEIGHT) -> None:
        """The page's top `height` pixels as a 256-colour PNG."""
        from PIL import Image
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height,
                  deviceScaleFactor=1, mobile=False)
        time.sleep(2)
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
        print(f"{out} ({out.stat().st_size // 1024} KB)")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` over `uri` on 127.0.0.1:port; returns once it answers /health."""
    proc = subprocess.Popen([str(MLFLOW), "ui", "--backend-store-uri", uri, "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"mlflow ui did not come up:\n{log.read_text()[-2000:]}")


def run_ids(run_dir: Path) -> dict[str, str]:
    """experiment, parent and the stage3 / generate child run ids of a run folder."""
    import mlflow
    parent = json.loads((run_dir / "mlflow_parent.json").read_text())
    client = mlflow.MlflowClient(parent["uri"])
    ids = {"experiment": client.get_run(parent["run_id"]).info.experiment_id,
           "parent": parent["run_id"]}
    for step in ("stage3", "generate"):
        record = run_dir / step / "mlflow_run.json"
        if record.exists():
            ids[step] = json.loads(record.read_text())["run_id"]
    return ids


def ui_settings(experiment: str, parent: str) -> dict[str, str]:
    """localStorage entries of MLflow 3.x's UI: training view, assistant closed, the
    headline columns chosen, the parent run expanded to show its steps."""
    page = {"selectedColumns": COLUMNS, "runsExpanded": {parent: True},
            "columnOrder": COLUMNS, "columnWidths": WIDTHS,
            "orderByKey": "attributes.start_time", "orderByAsc": False}
    return {"mlflow.workflowType_v1": json.dumps("machine_learning"),
            "mlflow.assistant.panelOpen_v1": "false",
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
            f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment}"]-ReactComponentState':
                json.dumps(page)}


def take(run_dir: Path, base: str, out: Path, profile: Path) -> None:
    ids = run_ids(run_dir)
    exp = f"{base}/#/experiments/{ids['experiment']}"
    browser = Browser(profile)
    try:
        browser.open(f"{exp}/runs?workflowType=machine_learning")
        settings = json.dumps(ui_settings(ids["experiment"], ids["parent"]))
        browser.run_js(f"for (const [k, v] of Object.entries({settings})) "
                       "localStorage.setItem(k, v)")
        browser.call("Page.reload", ignoreCache=True)
        time.sleep(8)
        browser.screenshot(out / "mlflow_runs_table.png", 560)
        browser.open(f"{exp}/runs/{ids['parent']}")
        browser.screenshot(out / "mlflow_parent_run.png", 1500)
        if "stage3" in ids:
            browser.open(f"{exp}/runs/{ids['stage3']}/model-metrics", 12)
            browser.type_into("Search metric charts", "loss")
            browser.screenshot(out / "mlflow_stage3_metrics.png", 1400)
        if "generate" in ids:
            browser.open(f"{exp}/runs/{ids['generate']}/artifacts/samples/sample_0.png")
            browser.screenshot(out / "mlflow_generate_artifacts.png", 700)
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args(argv)
    uri = json.loads((args.run / "mlflow_parent.json").read_text())["uri"]
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="mlflow-shots-") as tmp:
        ui = start_ui(uri, port, Path(tmp) / "ui.log")
        try:
            take(args.run, f"http://127.0.0.1:{port}", args.out, Path(tmp) / "profile")
        finally:
            ui.terminate()
            ui.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
