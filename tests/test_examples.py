"""Every example runs, in a short form (real SmolLM2-135M)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.real
def test_rag_pipeline_example():
    out = run("rag_pipeline.py", "--questions", "2", "--max-new-tokens", "24")
    assert "2/2 replies identical to plain greedy" in out


@pytest.mark.real
def test_generate_hook_example():
    out = run("generate_hook.py", "--max-new-tokens", "24")
    assert "identical to plain generate(): True" in out


@pytest.mark.real
def test_build_index_example(tmp_path):
    out = run("build_index.py", "--conversations", "100", "--out", str(tmp_path / "idx"))
    assert "100 documents" in out and "query:" in out and "MAT" in out


@pytest.mark.real
def test_langchain_rag_example():
    out = run("langchain_rag.py", "--questions", "2", "--max-new-tokens", "24")
    assert "2/2 replies identical to plain greedy; 2/2 streamed == final" in out
