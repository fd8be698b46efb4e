"""Serve a model from `ddptrain export --format onnx` with onnxruntime alone: no torch, no ddptrain.

    ddptrain export CKPT --server serve_onnx.py     # writes the model and a copy of this file
    pip install onnxruntime numpy                   # all the serving machine needs
    python serve_onnx.py model.onnx rows.csv [--out predictions.csv] [--json]

A standalone script shipped inside the package: ddptrain never imports it, `export --server` copies it out. Each graph input is a feature column, shape [rows, 1], and its type says how to feed
it: float32 (a number; an empty or NA cell is NaN), string (the category as written), int64 (a date or timestamp
as seconds since 1970-01-01 UTC; -2**63 is missing). Prints rows/s of the model call alone on stderr.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from datetime import datetime, timezone

import numpy as np
import onnxruntime as ort

NA = {"", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "?"}  # what ddptrain's reader calls missing
NAT = -(2 ** 63)


def seconds(text: str) -> int:
    """An ISO or YYYY/MM/DD date or timestamp as int64 seconds since 1970-01-01 UTC (missing: NAT)."""
    text = text.strip()
    if text in NA:
        return NAT
    stamp = datetime.fromisoformat(text.replace("/", "-"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return int(stamp.timestamp() // 1)


def feed(cells: list[str], onnx_type: str) -> np.ndarray:
    """One column of CSV cells as the graph input of that type, shape [rows, 1]."""
    if onnx_type == "tensor(float)":
        return np.array([np.nan if c.strip() in NA else float(c) for c in cells], dtype=np.float32)[:, None]
    if onnx_type == "tensor(int64)":
        return np.array([seconds(c) for c in cells], dtype=np.int64)[:, None]
    return np.array([c.strip() for c in cells], dtype=object)[:, None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--out", help="write a CSV of the outputs")
    parser.add_argument("--json", action="store_true", help="print the outputs as one JSON object")
    args = parser.parse_args()
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    with open(args.data, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    inputs = {i.name: feed([row[i.name] for row in rows], i.type) for i in session.get_inputs()}
    started = time.perf_counter()
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, inputs)))
    seconds_taken = time.perf_counter() - started
    print(f"onnxruntime: {len(rows):,} rows in {seconds_taken:.4f} s ({len(rows) / seconds_taken:,.0f} rows/s)",
          file=sys.stderr)
    if args.json:
        print(json.dumps({name: value.tolist() for name, value in outputs.items()}))
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            if "label" in outputs:
                classes = json.loads(session.get_modelmeta().custom_metadata_map["ddptrain.classes"])
                writer.writerow(["prediction"] + [f"prob_{c}" for c in classes])
                for label, probs in zip(outputs["label"], outputs["probabilities"]):
                    writer.writerow([label] + [f"{p:.6f}" for p in probs])
            else:
                writer.writerow(["prediction"])
                writer.writerows([f"{v:.6g}"] for v in outputs["value"])
    assert "torch" not in sys.modules and "ddptrain" not in sys.modules
    return 0


if __name__ == "__main__":
    sys.exit(main())
