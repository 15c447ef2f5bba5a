"""`mmedge bench` and the typer-free `mmedge query` entry, on the tiny fixtures (conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmedge.cli import entry
from mmedge.cli.main import app
from mmedge.cli.main import main as typer_main

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory: pytest.TempPathFactory, fp32_bundle: Path, synthetic_data: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("bench") / "index"
    res = runner.invoke(app, ["index", "build", str(fp32_bundle), "--data", str(synthetic_data["test"]),
                              "--out", str(out), "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def test_bench_json(fp32_bundle: Path, tiny_index: Path, synthetic_data: dict[str, Path]) -> None:
    res = runner.invoke(app, ["bench", str(fp32_bundle), "--index", str(tiny_index), "--data",
                              str(synthetic_data["test"]), "--queries", "12", "--images", "16",
                              "--cold-runs", "1", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert set(r) >= {"machine", "bundle", "text_encoder", "image_encoder", "query", "cold_start", "memory"}
    assert r["machine"]["usable_cores"] >= 1 and "versions" in r["machine"]
    assert r["text_encoder"]["n"] == 12 and 0 < r["text_encoder"]["p50_ms"] <= r["text_encoder"]["p99_ms"]
    assert r["image_encoder"]["images_per_s"] > 0
    q = r["query"]
    assert q["items"] == 48 and q["text"]["n"] == 12 and q["image"]["p50_ms"] > 0
    assert q["index_bytes_per_item"] > 0
    cold = r["cold_start"]
    assert "error" not in cold, cold
    assert cold["wall_p50_s"] > 0 and cold["cpu_p50_s"] > 0 and cold["peak_rss_mb"] > 10
    assert r["bundle"]["bytes"] > r["bundle"]["image_model_bytes"] > 0


def test_bench_table_without_index(int8_bundle: Path) -> None:
    res = runner.invoke(app, ["bench", str(int8_bundle), "--queries", "5", "--images", "4", "--cold-runs", "1"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "text encode, batch 1" in res.stdout and "image throughput" in res.stdout
    assert "cold start" in res.stdout and "text query" not in res.stdout


def test_bench_usage_error(fp32_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(typer_main, ["bench", str(fp32_bundle), "--queries", "0"], capsys)
    assert code == 2 and err.startswith("error: ") and out == ""


@pytest.mark.parametrize("args, expected", [
    (["B", "--index", "I", "--text", "a cat"], {"text": "a cat", "k": 10, "as_json": False}),
    (["-i", "I", "B", "-t", "x", "-k", "3", "--json", "--threads", "2", "--provider", "cpu"],
     {"text": "x", "k": 3, "as_json": True, "threads": 2, "provider": "cpu"}),
    (["B", "--index", "I", "--image", "p.png"], {"text": None, "image": Path("p.png")}),
])
def test_plain_query_parsed(args: list[str], expected: dict) -> None:
    got = entry.parse_plain_query(args)
    assert got is not None and got["bundle"] == Path("B") and got["index"] == Path("I")
    for key, value in expected.items():
        assert got[key] == value


@pytest.mark.parametrize("args", [
    [], ["B"], ["B", "--index"], ["B", "--index", "I", "--text", "x", "--help"],
    ["B", "--index", "I", "--text", "x", "--text", "y"], ["B", "C", "--index", "I", "--text", "x"],
    ["B", "--index=I", "--text", "x"], ["B", "--index", "I", "--text", "-x"], ["B", "--index", "I", "-k", "two"],
    ["B", "--index", "I", "--text", "x", "--unknown"],
])
def test_unusual_query_goes_to_typer(args: list[str]) -> None:
    assert entry.parse_plain_query(args) is None


def _run(main, args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra", [["--text", "a red circle", "-k", "3"], ["--text", "a blue square", "--json"],
                                   ["-k", "0", "--text", "x"]])
def test_entry_matches_typer_path(extra: list[str], fp32_bundle: Path, tiny_index: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ["query", str(fp32_bundle), "--index", str(tiny_index), *extra]
    assert entry.parse_plain_query(args[1:]) is not None
    fast = _run(entry.main, args, capsys)
    full = _run(typer_main, args, capsys)
    assert fast == full
    assert fast[0] in (0, 2)


def test_entry_error_matches_typer_path(fp32_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["query", str(fp32_bundle), "--index", str(tmp_path / "missing"), "--text", "x"]
    fast = _run(entry.main, args, capsys)
    full = _run(typer_main, args, capsys)
    assert fast == full and fast[0] == 1 and fast[2].startswith("error: ")


def test_entry_query_does_not_import_typer(fp32_bundle: Path, tiny_index: Path) -> None:
    code = ("import sys; from mmedge.cli.entry import main; main(sys.argv[1:]); "
            "print('typer' in sys.modules, 'pydantic' in sys.modules, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, "query", str(fp32_bundle), "--index", str(tiny_index),
                          "--text", "a red circle", "-k", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[-1] == "False False False"
