"""The ``mmedge`` command line on the tiny fixtures (conftest.py): commands through typer's
CliRunner, error handling through ``main()`` (which turns library errors into one line and
an exit code), in-process with ``capsys`` or in a subprocess where the real wrapper matters."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mmedge.cli.main import app, main
from mmedge.data import load_pairs
from mmedge.errors import BundleError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ----------------------------------------------------------------------------- helpers


def invoke(*args: Any):
    """Run the typer app in-process; returns click's Result (exit_code, stdout, output)."""
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_main(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """Call the console entry point in-process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "MMEDGE_DEBUG"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "mmedge.cli.main", *[str(a) for a in args]], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=full_env)


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    return lines[0]


def write_csv(path: Path, rows: list[tuple[Path, str]]) -> Path:
    """A captions CSV with absolute image paths (so keys are unique across files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for image, caption in rows:
            w.writerow([str(image), caption])
    return path


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def info_json(index: Path) -> dict[str, Any]:
    res = invoke("index", "info", index, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def test_rows(synthetic_data) -> list[tuple[Path, str]]:
    return [(p.image, p.caption) for p in load_pairs(synthetic_data["test"]).pairs]


@pytest.fixture(scope="module")
def image_index(tmp_path_factory, fp32_bundle, test_rows) -> tuple[Path, str]:
    """An image index of the first 40 test images, built with ``mmedge index build``
    (read-only for tests: copy before changing)."""
    root = tmp_path_factory.mktemp("cli-index")
    data = write_csv(root / "first40.csv", test_rows[:40])
    out = root / "images"
    res = invoke("index", "build", fp32_bundle, "--data", data, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    return out, res.stdout


@pytest.fixture(scope="module")
def text_index(tmp_path_factory, fp32_bundle, synthetic_data) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("cli-text-index") / "texts"
    res = invoke("index", "build", fp32_bundle, "--data", synthetic_data["test"], "--out", out,
                 "--modality", "text", "--no-progress")
    assert res.exit_code == 0, res.output
    return out, res.stdout


def assert_hits(hits: list[dict[str, Any]], k: int, modality: str) -> None:
    assert len(hits) == k
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 - 1e-5 <= s <= 1.0 + 1e-5 for s in scores)
    assert all(h["modality"] == modality for h in hits)
    assert len({h["key"] for h in hits}) == k
    assert all({"key", "score", "modality", "path", "caption", "metadata"} <= set(h) for h in hits)


# ----------------------------------------------------------------------------- export / verify


def test_export_writes_a_bundle_that_verifies(tmp_path, trained_run):
    out = tmp_path / "bundle"
    res = invoke("export", trained_run.run_dir, "--out", out, "--quantize", "fp32")
    assert res.exit_code == 0, res.output
    assert "wrote" in res.stdout and str(out) in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantization"] == {"image": "fp32", "text": "fp32"}
    assert manifest["embedding"]["dim"] == trained_run.config.pca_dim

    res = invoke("verify", out)
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"{out}: ok")


def test_export_bad_quantize_and_existing_out(capsys, tmp_path, trained_run, fp32_bundle):
    code, _out, err = run_main(capsys, "export", trained_run.run_dir, "--out", tmp_path / "b", "--quantize", "int3")
    assert code == 1 and one_error_line(err).startswith("error:") and "int3" in err
    before = folder_state(fp32_bundle)
    code, _out, err = run_main(capsys, "export", trained_run.run_dir, "--out", fp32_bundle)
    assert code == 1 and "already exists" in one_error_line(err)
    assert folder_state(fp32_bundle) == before


def test_verify_int8_bundle(capsys, int8_bundle):
    code, out, err = run_main(capsys, "verify", int8_bundle)
    assert code == 0, err
    figs = json.loads(out.split(": ok ", 1)[1].strip()[1:-1])
    assert figs["image_max_abs_diff"] <= figs["tolerance"]


def test_verify_reports_a_flipped_byte_in_image_onnx(capsys, tmp_path, fp32_bundle):
    bad = tmp_path / "bundle"
    shutil.copytree(fp32_bundle, bad)
    data = bytearray((bad / "image.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "image.onnx").write_bytes(bytes(data))
    code, out, err = run_main(capsys, "verify", bad)
    assert code == 1
    line = one_error_line(err)
    assert line.startswith("error:") and "image.onnx" in line
    assert out == ""


# ----------------------------------------------------------------------------- index


def test_index_build_images_and_info(image_index, fp32_bundle):
    index, stdout = image_index
    assert f"indexed 40 images into {index}" in stdout
    info = info_json(index)
    manifest = json.loads((fp32_bundle / "manifest.json").read_text())
    assert info["count"] == 40
    assert info["dim"] == manifest["embedding"]["dim"]
    assert info["fingerprint"] == manifest["embedding"]["fingerprint"]
    assert info["space"] == "ip" and info["readonly"] is True and info["unsaved_changes"] in (0, False)
    assert info["notes"] == []


def test_index_build_texts(text_index, synthetic_data):
    index, stdout = text_index
    n = len(load_pairs(synthetic_data["test"]).pairs)
    assert f"indexed {n} texts" in stdout
    assert info_json(index)["count"] == n


def test_index_add_and_remove(tmp_path, image_index, fp32_bundle, test_rows):
    index = tmp_path / "idx"
    shutil.copytree(image_index[0], index)
    more = write_csv(tmp_path / "rest.csv", test_rows[40:])
    res = invoke("index", "add", index, "--bundle", fp32_bundle, "--data", more, "--no-progress")
    assert res.exit_code == 0, res.output
    n = len(test_rows)
    assert f"added {n - 40} images" in res.stdout and f"{n} items" in res.stdout
    assert info_json(index)["count"] == n

    keys = [str(test_rows[0][0]), str(test_rows[45][0])]
    res = invoke("index", "remove", index, *keys)
    assert res.exit_code == 0, res.output
    assert f"removed 2 items from {index}; {n - 2} left" in res.stdout
    assert info_json(index)["count"] == n - 2

    # the removed items are gone from search results
    res = invoke("query", fp32_bundle, "--index", index, "--text", test_rows[0][1], "-k", str(n), "--json")
    assert res.exit_code == 0, res.output
    got = {h["key"] for h in json.loads(res.stdout)}
    assert len(got) == n - 2 and not got & set(keys)


def test_index_remove_unknown_key(capsys, tmp_path, image_index):
    index = tmp_path / "idx"
    shutil.copytree(image_index[0], index)
    before = folder_state(index)
    code, _out, err = run_main(capsys, "index", "remove", index, "no-such-key")
    assert code == 1 and "no-such-key" in one_error_line(err)
    assert folder_state(index) == before
    code, out, err = run_main(capsys, "index", "remove", index, "no-such-key", "--missing-ok")
    assert code == 0, err
    assert "removed 0 items" in out


def test_index_build_into_existing_folder_needs_overwrite(capsys, tmp_path, image_index, fp32_bundle, synthetic_data):
    index = tmp_path / "idx"
    shutil.copytree(image_index[0], index)
    before = folder_state(index)
    code, out, err = run_main(capsys, "index", "build", fp32_bundle, "--data", synthetic_data["test"],
                              "--out", index, "--no-progress")
    assert code == 2
    line = one_error_line(err)
    assert line.startswith("error:") and "--overwrite" in line
    assert folder_state(index) == before

    code, out, err = run_main(capsys, "index", "build", fp32_bundle, "--data", synthetic_data["test"],
                              "--out", index, "--no-progress", "--overwrite")
    assert code == 0, err
    assert info_json(index)["count"] == len(load_pairs(synthetic_data["test"]).pairs)


def test_index_build_skip_bad_skips_a_zero_byte_image(capsys, tmp_path, fp32_bundle, test_rows):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    rows = test_rows[:5] + [(empty, "a broken picture")] + test_rows[5:10]
    data = write_csv(tmp_path / "with-bad.csv", rows)

    code, _out, err = run_main(capsys, "index", "build", fp32_bundle, "--data", data, "--out", tmp_path / "strict",
                               "--no-progress")
    assert code == 1 and "empty.png" in one_error_line(err)

    code, out, err = run_main(capsys, "index", "build", fp32_bundle, "--data", data, "--out", tmp_path / "idx",
                              "--skip-bad", "--no-progress")
    assert code == 0, err
    assert "indexed 10 images" in out and "skipped 1 unreadable" in out
    assert "empty.png" in err
    assert info_json(tmp_path / "idx")["count"] == 10


def test_index_build_bad_modality(capsys, tmp_path, fp32_bundle, synthetic_data):
    code, _out, err = run_main(capsys, "index", "build", fp32_bundle, "--data", synthetic_data["test"],
                               "--out", tmp_path / "idx", "--modality", "audio")
    assert code == 2 and one_error_line(err).startswith("error:")
    assert not (tmp_path / "idx").exists()


# ----------------------------------------------------------------------------- query / eval


@pytest.mark.parametrize("k", [1, 7])
def test_query_text_json(image_index, fp32_bundle, test_rows, k):
    res = invoke("query", fp32_bundle, "--index", image_index[0], "--text", test_rows[3][1], "-k", k, "--json")
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert_hits(hits, k, "image")
    assert {h["key"] for h in hits} <= {str(r[0]) for r in test_rows[:40]}


def test_query_k_larger_than_the_index(image_index, fp32_bundle, test_rows):
    res = invoke("query", fp32_bundle, "--index", image_index[0], "--text", test_rows[0][1], "-k", 100, "--json")
    assert res.exit_code == 0, res.output
    assert_hits(json.loads(res.stdout), 40, "image")


def test_query_image_json(text_index, image_index, fp32_bundle, test_rows):
    res = invoke("query", fp32_bundle, "--index", text_index[0], "--image", test_rows[2][0], "-k", 5, "--json")
    assert res.exit_code == 0, res.output
    assert_hits(json.loads(res.stdout), 5, "text")
    # image -> image: the query image itself comes first, with cosine ~1
    res = invoke("query", fp32_bundle, "--index", image_index[0], "--image", test_rows[2][0], "-k", 3, "--json")
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert_hits(hits, 3, "image")
    assert hits[0]["key"] == str(test_rows[2][0]) and hits[0]["score"] > 0.999


def test_query_plain_output(image_index, fp32_bundle, test_rows):
    res = invoke("query", fp32_bundle, "--index", image_index[0], "--text", test_rows[0][1], "-k", 4)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and [ln.split(".")[0].strip() for ln in lines] == ["1", "2", "3", "4"]


def test_query_with_the_int8_bundle_uses_the_same_index(image_index, int8_bundle, test_rows):
    # fp32 and int8 bundles of one export share the fingerprint, so one index serves both
    res = invoke("query", int8_bundle, "--index", image_index[0], "--text", test_rows[0][1], "-k", 3, "--json")
    assert res.exit_code == 0, res.output
    assert_hits(json.loads(res.stdout), 3, "image")


def test_eval_json(fp32_bundle, synthetic_data):
    res = invoke("eval", fp32_bundle, "--data", synthetic_data["test"], "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    n = len(load_pairs(synthetic_data["test"]).pairs)
    assert out["n_images"] == out["n_texts"] == n
    for direction in ("text_to_image", "image_to_text"):
        m = out[direction]
        for key in ("R@1", "R@5", "R@10"):
            assert 0.0 <= m[key] <= 1.0
        assert m["R@1"] <= m["R@5"] <= m["R@10"]
        assert 1 <= m["median_rank"] <= n


def test_eval_table(fp32_bundle, synthetic_data):
    res = invoke("eval", fp32_bundle, "--data", synthetic_data["test"])
    assert res.exit_code == 0, res.output
    assert "text_to_image" in res.stdout and "image_to_text" in res.stdout and "R@10" in res.stdout


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("which", ["both", "neither"])
def test_query_needs_exactly_one_of_text_and_image(capsys, image_index, fp32_bundle, test_rows, which):
    extra = ["--text", "a red circle", "--image", test_rows[0][0]] if which == "both" else []
    code, out, err = run_main(capsys, "query", fp32_bundle, "--index", image_index[0], *extra)
    assert code == 2
    assert one_error_line(err).startswith("error:")
    assert out == ""


@pytest.mark.parametrize("k", ["0", "-3"])
def test_query_k_must_be_positive(capsys, image_index, fp32_bundle, k):
    code, _out, err = run_main(capsys, "query", fp32_bundle, "--index", image_index[0], "--text", "x", "-k", k)
    assert code == 2
    assert one_error_line(err).startswith("error:")


def test_unknown_flag_is_a_usage_error(capsys, fp32_bundle):
    code, _out, err = run_main(capsys, "verify", fp32_bundle, "--no-such-flag")
    assert code == 2
    assert "--no-such-flag" in err and "Traceback" not in err


def test_missing_bundle_folder_is_one_line_exit_1(tmp_path):
    missing = tmp_path / "no-bundle-here"
    proc = run_subprocess("verify", missing)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert line.startswith("error:") and str(missing) in line
    assert proc.stdout == ""


def test_missing_index_folder_is_one_line_exit_1(capsys, tmp_path, fp32_bundle):
    missing = tmp_path / "no-index-here"
    code, _out, err = run_main(capsys, "query", fp32_bundle, "--index", missing, "--text", "a red circle")
    assert code == 1
    assert str(missing) in one_error_line(err)


def test_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "no-bundle-here"
    proc = run_subprocess("--debug", "verify", missing)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "BundleError" in proc.stderr
    proc = run_subprocess("verify", missing, env={"MMEDGE_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_debug_in_process_reraises(capsys, tmp_path):
    with pytest.raises(BundleError, match="no-bundle-here"):
        main(["verify", str(tmp_path / "no-bundle-here"), "--debug"])


def test_usage_errors_from_subprocess_exit_2(fp32_bundle, tmp_path):
    proc = run_subprocess("query", fp32_bundle, "--index", tmp_path, "-k", "0", "--text", "x")
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith("error:")
    proc = run_subprocess("frobnicate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_writes_a_report(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # the demo trains with torch's default; keep it to one core here
    out = tmp_path / "demo"
    code, stdout, err = run_main(capsys, "demo", "--out", out, "--n-train", 160, "--n-test", 48, "--epochs", 1,
                                 "--no-progress")
    assert code == 0, err
    assert "report:" in stdout
    report = json.loads((out / "report.json").read_text())
    for q in ("fp32", "int8"):
        for direction in ("text_to_image", "image_to_text"):
            m = report[q][direction]
            for key in ("R@1", "R@5", "R@10"):
                assert 0.0 <= m[key] <= 1.0, (q, direction, key, m[key])
            assert m["R@1"] <= m["R@5"] <= m["R@10"]
            assert m["median_rank"] >= 1
        assert report[q]["n_texts"] == 48
    assert report["dataset"]["n_train"] == 160 and report["dataset"]["n_test"] == 48
    for q, path in report["bundles"].items():
        assert (Path(path) / "manifest.json").is_file(), q
    assert len(report["samples"]) == 4 and all(s["hits"] for s in report["samples"])
