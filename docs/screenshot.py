"""The README's screenshot of the Compare tab (one labelled row per pipeline), made the way the browser test drives
the page.

    python docs/screenshot.py [--runs runs] [--out docs/app_compare.png]

Needs the .[dev] extra (gradio, playwright) and Debian's chromium (apt-get install chromium).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs")
    p.add_argument("--out", default=str(Path(__file__).with_name("app_compare.png")))
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("no chromium: apt-get install chromium", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from dstudio.app.studio import launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = launch(port, args.runs, block=False)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/")
            page.get_by_role("button", name="Generate").click()
            page.locator("#row-0 img").first.wait_for(timeout=300_000)
            page.wait_for_function("() => [...document.querySelectorAll('.compare-row img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
            for label in page.locator(".compare-row [data-testid=markdown]").all_inner_texts():
                print(label, file=sys.stderr)
            page.get_by_role("button", name="Compare two").click()
            page.locator("#slider img").nth(1).wait_for(timeout=60_000)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
