"""Both models' answers on an image set and on drifted copies of it, computed offline with onnxruntime
(the served python runtime runs the same ONNX files with the same library): the input of the audit
simulations and of the label-free certification check (bench/audit_sim.py).

    .venv/bin/python bench/audit_probs.py --little runs/lite/little.onnx --big runs/lite/big.onnx \
        --data ../shared/data/imagenet-sample --out bench/results/audit/answers.npz

Drifts (applied to the wire image, uint8 [S, S, 3]): clean, blur (Gaussian, radius 3), dark (x 0.35),
noise (Gaussian, sigma 40). Writes per drift little's confidence and class and big's class and
confidence (compact: the PROBS are not kept), the labels, and both models' MACs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from littlebig.client.datasets import load_image_set
from littlebig.client.images import to_wire_batch
from littlebig.export import ort_session
from littlebig.export.metadata import read_metadata
from littlebig.labels import ClassLabels


def drifted(batch: np.ndarray, drift: str, seed: int = 0) -> np.ndarray:
    """The wire images under one drift."""
    if drift == "clean":
        return batch
    if drift == "blur":
        return np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(3))) for x in batch])
    if drift == "dark":
        return (batch.astype(np.float32) * 0.35).astype(np.uint8)
    if drift == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(batch + rng.normal(0, 40, batch.shape), 0, 255).astype(np.uint8)
    raise ValueError(drift)


DRIFTS = ("clean", "blur", "dark", "noise")


def answers(session, images: np.ndarray, batch: int = 25) -> tuple[np.ndarray, np.ndarray]:
    probs = np.concatenate([session.run(["PROBS"], {"IMAGE": images[i:i + batch]})[0] for i in range(0, len(images), batch)])
    return probs.argmax(1), probs.max(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--little", required=True)
    parser.add_argument("--big", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    meta = read_metadata(args.little)
    size, crop = int(meta["wire_size"]), float(meta.get("crop_pct", 0.875))
    images = load_image_set(args.data, model_labels=ClassLabels.from_json(meta["labels"]))
    wire = to_wire_batch(images.paths, size, crop)
    little, big = ort_session(args.little), ort_session(args.big)
    out = {"labels": images.labels, "paths": np.asarray([str(p) for p in images.paths]),
           "macs": np.asarray([int(meta["macs"]), int(read_metadata(args.big)["macs"])])}
    for drift in DRIFTS:
        batch = drifted(wire, drift)
        out[f"{drift}_little_class"], out[f"{drift}_little_conf"] = answers(little, batch)
        out[f"{drift}_big_class"], out[f"{drift}_big_conf"] = answers(big, batch)
        print(drift, "little acc", float((out[f"{drift}_little_class"] == images.labels).mean()),
              "big acc", float((out[f"{drift}_big_class"] == images.labels).mean()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **out)


if __name__ == "__main__":
    main()
