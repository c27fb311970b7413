"""Progress reporting: plain lines off a terminal, a bar on one; tiles reported during extraction."""

from __future__ import annotations

import io
import logging

import pytest

from pipeline.progress import Progress, RoundClock, StepLog, fmt_seconds, is_terminal


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_non_terminal_stream_gets_newline_terminated_lines_without_carriage_returns():
    out = io.StringIO()
    assert not is_terminal(out)
    with Progress(50, "extract", "tile", stream=out, every_pct=20, every_s=1e9) as bar:
        assert bar.plain and bar.bar is None
        for _ in range(10):
            bar.update(5, postfix="slide 1/1")
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert 4 <= len(lines) <= 7, lines  # every 20 %, and a closing line: not one line per update
    assert lines[0].startswith("extract: 10/50 tile (20%)") and "ETA" in lines[0] and "slide 1/1" in lines[0]
    assert lines[-1].startswith("extract: 50/50 tile (100%)") and lines[-1].endswith("done")


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    with Progress(3, "x", stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_terminal_stream_gets_a_bar():
    out = _Tty()
    with Progress(4, "extract", "slide", stream=out) as bar:
        assert bar.bar is not None and not bar.plain
        bar.update(2)
        bar.update(2, postfix="9 tiles")
    assert "\r" in out.getvalue() and "4/4" in out.getvalue()


def test_round_clock_eta_is_rounds_left_times_mean_round(monkeypatch):
    t = iter([100.0, 110.0, 120.0])
    monkeypatch.setattr("pipeline.progress.time.perf_counter", lambda: next(t))
    c = RoundClock()
    c.start()
    assert c.lap(3) == (10.0, 30.0)
    assert c.text(0) == "elapsed 20 s, ETA 0.0 s"
    assert fmt_seconds(125) == "2 min 05 s" and fmt_seconds(7300) == "2 h 01 min"


def test_step_log_numbers_steps_and_returns_results(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.attribute")
    s = StepLog("attribute", 2)
    assert s.run("tiles IG", lambda a, b=0: a + b, 1, b=2) == 3
    assert s.run("genes IG", lambda: "ok") == "ok"
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "attribute 1/2: tiles IG ..." and msgs[-1].startswith("attribute 2/2: genes IG done in")


def test_extraction_of_a_small_slide_reports_tile_progress(tmp_path, he_rgb, capsys):
    from data_specs.config import ExtractConfig
    from models import build_encoder
    from pipeline.cohorts.demo import write_pyramid_tiff
    from pipeline.slides.extract import extract_slides

    p = tmp_path / "small.tif"
    write_pyramid_tiff(p, he_rgb, mpp=0.5)
    enc = build_encoder("test_efficientnet", random_weights=True)
    cfg = ExtractConfig(encoder="test_efficientnet", random_weights=True, batch_size=2)
    capsys.readouterr()
    (r,) = extract_slides([p], tmp_path / "f", enc, cfg, progress=True)
    err = capsys.readouterr().err  # pytest's capture is not a terminal: plain lines
    assert r.status == "done" and r.tiles > 0
    assert "\r" not in err
    tile_lines = [ln for ln in err.splitlines() if ln.startswith("small tiles:")]
    assert tile_lines and tile_lines[-1].startswith(f"small tiles: {r.tiles + r.rejected}/")
    assert any(ln.startswith("extract: 1/1 slide (100%)") and f"{r.tiles} tiles" in ln for ln in err.splitlines())


@pytest.mark.parametrize("stream", [None, object()])
def test_is_terminal_is_false_without_isatty(stream):
    assert not is_terminal(stream)
