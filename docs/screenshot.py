"""Take the README's screenshot: the quickstart's "Landscape" dashboard in TensorBoard, in headless Chromium.

    apt-get install -y chromium          # Debian's package; any Chromium/Chrome binary on PATH works
    python docs/screenshot.py            # ~1-2 minutes: trains the quickstart, serves it, shoots it

Writes ``docs/images/landscape_dashboard.png`` (cropped to the dashboard; Pillow is used for the crop if present).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "images" / "landscape_dashboard.png"
PORT = 6006


def wait_for(url: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


def main() -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("no Chromium on PATH: apt-get install -y chromium")
    logs = tempfile.mkdtemp(prefix="landscape-shot-")
    subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--root", logs], check=True)
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", logs, "--port", str(PORT), "--host", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(f"http://127.0.0.1:{PORT}/")
        raw = Path(logs) / "shot.png"
        subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--window-size=1600,1400",
                "--virtual-time-budget=25000",  # lets the charts load and draw before the capture
                f"--screenshot={raw}",
                f"http://127.0.0.1:{PORT}/?darkMode=false#custom_scalars",
            ],
            check=True,
            timeout=180,
        )
    finally:
        board.terminate()
        board.wait(timeout=30)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    try:
        from PIL import Image

        Image.open(raw).crop((0, 0, 1600, 1060)).save(OUTPUT, optimize=True)
    except ImportError:
        shutil.copyfile(raw, OUTPUT)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
