"""`littlebig example`: Train and export a small real-data example pair."""

from __future__ import annotations

from .options import command, require_export_extra


def run(args) -> None:
    require_export_extra("example")
    from littlebig.examples.build import build_example

    summary = build_example(args.name, args.out, seed=args.seed, epoch_scale=args.epoch_scale)
    data = "calib/ and test/ (images/ + masks/)" if summary["task"] == "segmentation" else "calib.npz, test.npz"
    print(f"wrote {args.out}: little.onnx, big.onnx ({summary['task']}), {data}, labels.txt, example.json")


def add(sub) -> None:
    p = command(sub, "example", help="train and export a small real-data pair: multilabel (handwritten digits "
                       "with binary attributes), text (Debian package descriptions by section) or segmentation "
                       "(generated shapes labelled per pixel)")
    p.add_argument("name", choices=["multilabel", "text", "segmentation"], help="which example")
    p.add_argument("--out", required=True, help="folder for little.onnx, big.onnx, the calibration and test data, "
                   "example.json")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and the training")
    p.add_argument("--epoch-scale", type=float, default=1.0, help="train this fraction (or multiple) of the usual epochs")
    p.set_defaults(func=run)
