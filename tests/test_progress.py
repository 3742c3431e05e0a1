"""The progress display: a log (not a terminal) gets a bounded number of full lines, never carriage returns."""

import io

from diffusionlab.progress import LineProgress, _Silent, progress


def test_log_gets_one_line_per_tenth_and_no_carriage_returns():
    out = io.StringIO()  # not a terminal
    bar = progress(range(1000), desc="train", stream=out)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.1")
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    # one line per 10 % (10 lines) plus at most the closing line
    assert 10 <= len(lines) <= 11, lines
    assert lines[-1].startswith("train: 100% 1000/1000") and lines[-1].endswith("loss=0.1")


def test_seconds_rule_and_initial_offset():
    out = io.StringIO()
    bar = LineProgress(total=100, initial=40, desc="x", stream=out, every_percent=1000, every_seconds=0.0)
    bar.update(1)
    assert out.getvalue().startswith("x: 41% 41/100")
    bar.close()
    bar.close()  # idempotent
    assert out.getvalue().count("\n") == 2


def test_disabled_is_silent_but_iterates():
    out = io.StringIO()
    bar = progress(range(3), enabled=False, stream=out)
    assert isinstance(bar, _Silent) and list(bar) == [0, 1, 2] and out.getvalue() == ""
