"""Headless Chromium (Debian's `chromium`, workflow/ci/install_chromium.sh) for tests of pages a
person reads: the DOM after the page's scripts ran, and screenshots."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

# As root in a container Chromium needs --no-sandbox; without the networking flags it keeps trying
# Google's services and floods the log with refused connections.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def chromium() -> str | None:
    """The Chromium binary, or None when it is not installed."""
    return shutil.which("chromium")


def run_chromium(url: str, *args: str, budget_ms: int = 10_000, timeout: float = 60) -> str:
    """Chromium's stdout for `url` with `args`, in a fresh profile; the page's scripts and their
    requests get `budget_ms` of virtual time to finish."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        out = subprocess.run([chromium() or "chromium", *FLAGS, f"--user-data-dir={profile}",
                              f"--virtual-time-budget={budget_ms}", "--window-size=1400,2400", *args, url],
                             capture_output=True, text=True, timeout=timeout, check=True)
    return out.stdout


def rendered_dom(url: str, budget_ms: int = 10_000) -> str:
    """The page's DOM once its scripts have run (`--dump-dom`)."""
    return run_chromium(url, "--dump-dom", budget_ms=budget_ms)
