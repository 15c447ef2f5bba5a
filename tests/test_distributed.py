"""Training under torch.distributed: two CPU processes (torchrun, gloo) train the same
model as one process with the same global batch (= twice the per-process batch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = r'''
import json, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from mmedge.train.pipeline import train

data, val, out = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = tiny_config(epochs=2, batch_size=32, adversarial=True)
cfg.stage1.batch_size = 32
cfg.image.mixstyle = 0.0  # MixStyle mixes within each process's slice: not the same batch maths
curve = []
def progress(stage, step, total, metrics):
    curve.append([stage, step, metrics["loss"]])
res = train(data, out, cfg, val_data=val, on_progress=progress)
import os
if os.environ.get("RANK", "0") == "0":
    with open(out + "/curve.json", "w") as f:
        json.dump(curve, f)
'''


def _run(nproc: int, script: Path, data: dict[str, Path], out: Path) -> list:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), str(data["train"]), str(data["val"]), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "curve.json").read_text())


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, synthetic_data):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    one = _run(1, script, synthetic_data, tmp_path / "one")
    two = _run(2, script, synthetic_data, tmp_path / "two")

    assert [c[:2] for c in one] == [c[:2] for c in two]  # same stages and steps
    stages = {c[0] for c in one}
    assert {"stage1-image", "stage1-text", "stage2"} <= stages
    a = torch.tensor([c[2] for c in one], dtype=torch.float64)
    b = torch.tensor([c[2] for c in two], dtype=torch.float64)
    # same data, same global batches, gradients averaged over ranks: only float
    # summation order differs, which grows slowly over the steps
    assert torch.allclose(a, b, rtol=2e-3, atol=1e-4), (a - b).abs().max()
    # and the trained weights agree
    wa = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-2, atol=1e-3), k
    # only rank 0 wrote the run folder, and it is complete
    for name in ("model.pt", "config.json", "tokenizer.json", "metrics.json", "stage2/checkpoint.pt"):
        assert (tmp_path / "two" / name).exists(), name
