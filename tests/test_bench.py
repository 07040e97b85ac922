"""The benchmark harness: its measuring tools, its baselines, and a smoke run of the whole
table at tiny sizes (no timing assertions: figures depend on the machine's load)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.child import ChildError, run_child
from bench.report import Row, machine_info, render
from bench.run_all import BENCHMARKS

# torch, librosa and the corpus generator are imported inside the tests that use them, so
# that the child processes which import this module for `allocate` stay small.

REPO = Path(__file__).resolve().parent.parent
ALL_KEYS = [k for keys, _ in BENCHMARKS.values() for k in keys]


def allocate(mb: int) -> dict:
    """Run in a child by the tests: hold `mb` MB of touched memory, return its sum."""
    block = np.ones(mb * 2**20 // 8)
    return {"sum": float(block.sum())}


def fail() -> dict:
    raise ValueError("this measurement broke on purpose")


def test_child_reports_result_and_peak_memory(tmp_path):
    res = run_child("tests.test_bench:allocate", {"mb": 200}, tmp_path / "alloc.log")
    assert res.result["sum"] == 200 * 2**20 // 8
    assert res.peak_process_mb >= 200          # the kernel's peak of the child
    assert res.peak_tree_mb >= 150             # polled; may miss the very top between polls
    small = run_child("tests.test_bench:allocate", {"mb": 1}, tmp_path / "small.log")
    assert small.peak_process_mb < res.peak_process_mb - 150


def test_child_failure_names_the_error_and_log(tmp_path):
    with pytest.raises(ChildError, match="broke on purpose") as info:
        run_child("tests.test_bench:fail", {}, tmp_path / "fail.log")
    assert "fail.log" in str(info.value)


def test_librosa_baseline_chunks_like_decode_only(tmp_path):
    from bench.baselines import decode_only, librosa_chunk_folder
    from data_prep.corpus import generate_corpus
    files = generate_corpus(tmp_path / "c", 2, 2.5, seed=3)   # mono+stereo, 44.1 kHz
    out = librosa_chunk_folder(files, tmp_path / "chunks", 24000, 1, 1.0)
    saved = sorted((tmp_path / "chunks").glob("*.npy"))
    assert out["chunks"] == len(saved) == 4                     # 2 whole 1 s chunks per song
    assert np.load(saved[0]).shape == (1, 24000)
    limit = decode_only(files, 24000, 1)
    assert abs(limit["audio_s"] - out["audio_s"]) < 0.01 * out["audio_s"]


def test_encodec_in_getitem_encodes_on_access():
    import torch

    from bench.baselines import EncodecInGetitem
    from data_prep.codecs import load_codec
    from pipeline import config
    cfg = config.load(None, "local", ["encode.codec=encodec", "encode.pretrained=false"])
    codec = load_codec(cfg.encode, 24000, "cpu", seed=0)
    rng = np.random.default_rng(0)
    arrays = {"a": rng.uniform(-0.5, 0.5, (2, 1, 4800)).astype(np.float32)}
    ds = EncodecInGetitem([{"song": "a", "input": 0, "target_song": "a", "target": 1}],
                          arrays, codec)
    inp, tgt = ds[0]
    assert inp.shape == tgt.shape == (128, codec.frames(4800))
    assert torch.allclose(tgt, codec.encode(torch.from_numpy(arrays["a"][1])[None])[0])
    assert not torch.allclose(inp, tgt)
    assert not inp.is_inference()                               # usable as training input


def test_render_marks_missed_and_unmeasured_rows():
    rows = [Row("1a", "x / y", "2x", "y: 1x", 2.0, ">= 1.8", True),
            Row("5a", "submit", "not measured", "", None, "<= 10 s", None, "no cluster"),
            Row("2a", "peak", "400 MB", "base: 900 MB", 0.44, "<= 300 MB", False)]
    text = render(rows, machine_info(), "make bench", 1.0, ["## Extra\n"], "0.1")
    assert "| 1a | x / y | 2x | y: 1x | 2 | >= 1.8 | yes |" in text
    assert "| 5a | submit | not measured |  | n/a | <= 10 s | not measured |" in text
    assert "**NO**" in text and "no cluster" in text and "## Extra" in text
    assert "- OPENBLAS_CORETYPE: " in text and "- openblas_kernel: " in text


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"\d[a-z]", cells[0]):
            rows[cells[0]] = cells
    return rows


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1800)   # every benchmark end to end: well past the suite's 900 s on a busy machine
def test_quick_run_writes_every_row_with_positive_ratios(tmp_path):
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--sizes", "quick",
                           "--out", str(out), "--work", str(tmp_path / "work")],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout                                   # printed as well as written
    rows = table_rows(text)
    assert list(rows) == ALL_KEYS
    for key, cells in rows.items():
        if key == "5a" and cells[6] == "not measured":          # no SLURM cluster here
            assert re.search(r"\*\*5a\*\*: .*cluster", text)
            continue
        assert float(cells[4]) > 0, cells
    for needed in ("## Machine", "OPENBLAS_CORETYPE", "## 6. Expected per-GPU throughput"):
        assert needed in text


def test_scaling_loader_workers_follow_the_measured_data_time():
    from bench.scaling import loader_text
    assert "1 loader worker" in loader_text("100 µs", 400.0)   # 0.4 ms x 400/s = 0.16 of one
    assert "4 loader worker" in loader_text(1955.0, 407.0)      # 7.8 ms x 407/s = 3.2
    assert loader_text(None, 400.0) == "not measured in this run"
