"""What any Python-backend gate pays per execution before doing anything, beside the gate's own time.

Serves the gate (little in its process and not) and an echo model with the gate's config
(bench/peers/echo/model.py: reads the rows, answers zeros) on one server, and measures each one's
time per execution from Triton's statistics at the given batch sizes, one request at a time, in
rotating rounds (client/gate_cost.py; the echo calls no child, so its figure is its whole compute).

    .venv/bin/python bench/gate_floor.py --demo runs/demo --batches 1,8,32 --rounds 5 --out bench/results/gate_floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from gate_ab import add_variant, own_costs  # bench/gate_ab.py, beside this script

from littlebig.client.images import list_images, to_wire_batch
from littlebig.client.infer import GATE_MODEL, LittleBigClient
from littlebig.model_repository.builder import RepositoryOptions, build_repository
from littlebig.server import TritonServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="folder with little.onnx and big.onnx")
    parser.add_argument("--data", default="../shared/data/imagenet-sample")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gate_floor_") as tmp:
        work = Path(tmp)
        repo = build_repository(Path(args.demo) / "little.onnx", Path(args.demo) / "big.onnx", work / "repository",
                                RepositoryOptions(threshold=0.0))
        models = {"gate": GATE_MODEL, "gate_little_in_gate": add_variant(repo, "in_gate", parameters={"little_onnx": "little/1/model.onnx"}),
                  "echo": add_variant(repo, "echo", Path(__file__).parent / "peers" / "echo" / "model.py")}
        batches = [int(b) for b in args.batches.split(",")]
        with TritonServer(repo, log_file=work / "tritonserver.log") as server:
            with LittleBigClient(server.grpc_url) as client:
                info = client.gate_info()
            images = to_wire_batch(list_images(args.data)[:64], info.wire_size, info.crop_pct)
            ms = own_costs(server.grpc_url, server.metrics_url, info.little_model, images, models, batches, args.rounds)
    result = {name: {str(b): statistics.median(v) for b, v in per.items()} for name, per in ms.items()}
    for name, per in result.items():
        print(f"{name:20s} own ms per execution (median of {args.rounds}): " + ", ".join(f"batch {b}: {v:.2f}" for b, v in per.items()))
    Path(args.out).write_text(json.dumps({"rounds": args.rounds, "own_ms_per_execution": result,
                                          "per_round": {n: {str(b): v for b, v in per.items()} for n, per in ms.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
