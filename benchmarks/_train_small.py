"""Run by benchmarks/distributed.py under torchrun: train the demo recipe (stage 1 off,
2 epochs) on DATA into OUT; the global batch is the same for any process count."""

import json
import os
import sys
from pathlib import Path

from mmedge.train.config import synthetic_recipe
from mmedge.train.pipeline import train

data, out, nproc = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
cfg = synthetic_recipe(0)
cfg.stage1.enabled = False
cfg.stage2.epochs = 2
res = train(data, out, cfg)
if os.environ.get("RANK", "0") == "0":  # rank 0 wrote metrics.json; add the epoch count
    m = json.loads((out / "metrics.json").read_text())
    m["stage2_epochs"] = cfg.stage2.epochs
    (out / "metrics.json").write_text(json.dumps(m, indent=2))
