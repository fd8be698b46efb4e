"""What serving costs: onnxruntime on an exported model against `ddptrain predict`, same rows, one process.

    pip install 'ddptrain[export]' onnxruntime
    python benchmarks/export_speed.py [--rows 200000] [--repeats 3] [--out benchmarks/out/export_speed]

Writes a table like the tests' (text categories, dates, booleans, every NA token), trains one epoch, exports ONNX,
then times, alternating, (a) the whole path from the CSV to predictions: the `ddptrain predict` command against
`ddptrain/serve_onnx.py` (onnxruntime + the csv module, no torch), and (b) the model call alone on the same rows:
onnxruntime's `run` on the raw columns (preprocessing included) against ddptrain's preprocessing transform plus
the torch forward (`predict_rows`). Medians; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "export_speed")
    args = parser.parse_args()

    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch
    from conftest import clean_env, real_table

    from ddptrain import serve_onnx
    from ddptrain.checkpoint import inference_model, load_checkpoint
    from ddptrain.config import FitConfig
    from ddptrain.data import labelled_split
    from ddptrain.evaluate import predict_rows
    from ddptrain.export import export_checkpoint
    from ddptrain.run import fit
    from ddptrain.tables import read_table

    os.environ.setdefault("XDG_CACHE_HOME", tempfile.mkdtemp(prefix="ddptrain-bench-cache-"))
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    data = real_table(args.out / "rows.csv", rows=args.rows)
    fit(FitConfig(data=str(data), target="label", epochs=1, out=str(args.out / "run"), quiet=True, cache=False))
    ckpt = args.out / "run" / "checkpoints" / "best.pt"
    model_file = export_checkpoint(ckpt, "onnx", None, 18, overwrite=False)
    env = clean_env(OMP_NUM_THREADS="2")

    def command_seconds(cmd: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        return time.perf_counter() - started

    predict_cmd = [sys.executable, "-m", "ddptrain", "predict", str(ckpt), "--data", str(data), "--out",
                   str(args.out / "p.csv"), "--overwrite"]
    serve_cmd = [sys.executable, str(ROOT / "ddptrain" / "serve_onnx.py"), str(model_file), str(data), "--out",
                 str(args.out / "o.csv")]
    # the model call alone: the same rows already read, each side from its own input form
    torch.set_num_threads(2)
    model, spec, _ = inference_model(load_checkpoint(ckpt), torch.device("cpu"), ckpt)
    table = read_table(str(data))
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    rows = list(__import__("csv").DictReader(data.open(newline="")))
    feeds = {i.name: serve_onnx.feed([r[i.name] for r in rows], i.type) for i in session.get_inputs()}

    def torch_call() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            predict_rows(model, labelled_split(spec, table, require_target=False), spec)
        return time.perf_counter() - started

    def onnx_call() -> float:
        started = time.perf_counter()
        session.run(None, feeds)
        return time.perf_counter() - started

    timings: dict[str, list[float]] = {"predict_command": [], "serve_onnx_command": [], "torch_call": [],
                                       "onnx_call": []}
    for _ in range(args.repeats):
        timings["predict_command"].append(command_seconds(predict_cmd))
        timings["serve_onnx_command"].append(command_seconds(serve_cmd))
        timings["torch_call"].append(torch_call())
        timings["onnx_call"].append(onnx_call())
    rate = {k: args.rows / statistics.median(v) for k, v in timings.items()}
    gap = np.abs(np.loadtxt(args.out / "p.csv", delimiter=",", skiprows=1, usecols=(1, 2))
                 - np.loadtxt(args.out / "o.csv", delimiter=",", skiprows=1, usecols=(1, 2))).max()
    result = {"rows": args.rows, "repeats": args.repeats, "rows_per_s": {k: round(v) for k, v in rate.items()},
              "onnx_call / torch_call": round(rate["onnx_call"] / rate["torch_call"], 2),
              "serve_onnx_command / predict_command": round(rate["serve_onnx_command"] / rate["predict_command"], 2),
              "max_probability_difference": float(gap)}
    print(json.dumps(result, indent=2))
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
