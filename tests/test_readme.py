"""The README's example runs as written."""

import re
from pathlib import Path

from scipy import stats


def test_readme_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    # the coin's posterior is Beta(2 + 6, 2 + 2): both methods find its mean
    exact = stats.beta(8, 4)
    assert abs(namespace["mc"].draws("p").mean() - exact.mean()) < 0.01
    assert abs(namespace["vi"].draws("p").mean() - exact.mean()) < 0.02
    assert (tmp_path / "coin.nc").exists()
