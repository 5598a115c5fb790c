"""Regenerate docs/web-page.png: the web page showing the default model's real result.

    python scripts/web_page_screenshot.py [--models models] [--out docs/web-page.png]

Starts `gendr-serve` on 127.0.0.1 over the repository `scripts/run.sh` builds (the embedded Real-ESRGAN
×4plus), uploads a real photo through headless Chromium (Debian's, as the tests use) with the page's
options, waits for the result and saves the screenshot. The test suite's own screenshot uses the test
backend's nearest-neighbour output, which a newcomer would take for the model's quality.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _photo(path: Path) -> None:
    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).resize((180, 120), Image.Resampling.LANCZOS).save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "web-page.png")
    args = ap.parse_args()
    if not (args.models / "realesrgan-x4plus" / "manifest.json").is_file():
        print(f"no default model under {args.models}: run `gendr-build default` first", file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    port = _free_port()
    env = {
        **os.environ,
        "GENDR_MODEL_REPOSITORY": str(args.models),
        "GENDR_DEFAULT_MODEL": "realesrgan-x4plus",
    }
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "chelsea.png"
        _photo(photo)
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            end = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > end or proc.poll() is not None:
                    print("the server did not become ready", file=sys.stderr)
                    return 1
                time.sleep(0.5)
            opts = webdriver.ChromeOptions()
            opts.binary_location = "/usr/bin/chromium"
            for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1250",
                      f"--user-data-dir={tmp}/profile", "--disable-background-networking"):  # fmt: skip
                opts.add_argument(a)
            os.environ.setdefault("SE_OFFLINE", "true")
            d = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)
            try:
                d.get(url + "/")
                d.find_element(By.ID, "file").send_keys(str(photo))
                Select(d.find_element(By.ID, "size-mode")).select_by_value("scale")
                scale = d.find_element(By.ID, "scale")
                scale.clear()
                scale.send_keys("4")
                Select(d.find_element(By.ID, "format")).select_by_visible_text("png")
                d.find_element(By.ID, "go").click()
                WebDriverWait(d, 600).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
                slide = "const s = document.getElementById('slider'); s.value = 40;"
                d.execute_script(slide + " s.dispatchEvent(new Event('input'))")
                time.sleep(0.5)
                args.out.write_bytes(d.get_screenshot_as_png())
            finally:
                d.quit()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
