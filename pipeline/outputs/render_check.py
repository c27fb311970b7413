"""Checks a rendered report: opens it in headless Chromium and reads back which images did not decode and
which errors the page raised (the report itself carries no script; the probe goes into a temporary copy)."""

from __future__ import annotations

import html
import json
from pathlib import Path

_PROBE = """<script>
(function () {
  var errs = [];
  window.addEventListener('error', function (e) {
    errs.push('error: ' + (e.message || (e.target && e.target.src) || e));
  }, true);
  var ce = console.error;
  console.error = function () {
    errs.push('console.error: ' + Array.from(arguments).join(' '));
    ce.apply(console, arguments);
  };
  window.addEventListener('load', function () {
    var imgs = Array.from(document.images);
    var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                  .map(function (i) { return i.alt; });
    var out = document.createElement('pre');
    out.id = 'render-check';
    out.textContent = JSON.stringify({images: imgs.length, broken: bad, errors: errs});
    document.body.appendChild(out);
  });
})();
</script>"""


def render_check(report: Path, chromium: str = "chromium", timeout: float = 120.0) -> dict:
    """Open ``report`` in headless Chromium: ``{"images", "broken", "errors", "console"}``.

    A copy of the page gets a probe script that, once the page has loaded, records every image that did not
    decode (``naturalWidth == 0``) and every error event into the DOM, read back with ``--dump-dom``;
    console messages Chromium logs at level >= warning (``--enable-logging=stderr``) are in ``console``.
    """
    import re
    import shutil
    import subprocess
    import tempfile

    exe = shutil.which(chromium)
    if exe is None:
        raise FileNotFoundError(f"{chromium}: not found on PATH (Debian: apt-get install chromium)")
    page = Path(report).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(page.replace("<head>", "<head>" + _PROBE, 1))
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp}/profile",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            probe.as_uri(),
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', r.stdout, re.S)
    if m is None:
        raise RuntimeError(f"chromium did not render the page (exit {r.returncode}): {r.stderr[-2000:]}")
    res = json.loads(html.unescape(m.group(1)))
    res["console"] = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln]
    return res
