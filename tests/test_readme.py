"""The README's "Use it from Python" snippets run as written (on tiny runs made at the paths they name)."""

import os
import pathlib
import re

from diffusionlab.cli import main

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TINY = ["--set", "train.steps=3", "--set", "data.num=256", "--set", "train.batch_size=32", "--set", "model.hidden=16",
        "--set", "model.depth=1", "--quiet"]


def _python_snippets() -> list[str]:
    text = README.read_text()
    section = text.split("## Use it from Python", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_python_section_runs(tmp_path, capsys):
    snippets = _python_snippets()
    assert len(snippets) >= 4
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["train", "toy2d", "--out", "runs/toy", *TINY]) == 0
        assert main(["train", "toy2d_sde", "--out", "runs/toy_sde", *TINY]) == 0
        namespace: dict = {}
        for code in snippets:
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "-ELBO" in out and "NLL" in out and "TimeGrid(karras, 10 steps" in out
