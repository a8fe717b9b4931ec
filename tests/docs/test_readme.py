"""The README's "use goldfish loss in your own Flax training step" example runs as written."""

import pathlib
import re

import helpers

REPO = pathlib.Path(helpers.REPO)


def test_readme_flax_example_runs(capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use goldfish loss in your own Flax training step", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    loss, dropped = re.search(r"loss ([\d.]+)\s+dropped ([\d.]+)%", out).groups()
    assert 4.0 < float(loss) < 5.2  # ~log(100) at initialisation
    assert 10 < float(dropped) < 40  # ~1/k of 256 targets
