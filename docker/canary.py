"""Liveness canary for the container: one tiny inference through little, big and the gate (at T = 1,
so the gate calls both). Triton's /v2/health/ready stays green when a model's python stub has died;
an inference does not. Exit 0 when every model answers, else 1 with a line naming the first that did
not, so Docker's HEALTHCHECK or a Kubernetes liveness probe restarts the container.

Standard library only (the NGC image has python3, not tritonclient):
    python3 canary.py [--url http://127.0.0.1:8000] [--models little,big,littlebig] [--timeout 10]
"""

import argparse
import json
import sys
import urllib.error
import urllib.request

GATE = "littlebig"


def _call(url, timeout, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


def canary(base, model, timeout):
    """One all-zero image of the model's input shape; raises on any failure."""
    config = _call(f"{base}/v2/models/{model}/config", timeout)
    image = next(i for i in config["input"] if i["name"] == "IMAGE")
    dims = [1] + [int(d) for d in image["dims"]]
    size = 1
    for d in dims:
        size *= d
    body = {"inputs": [{"name": "IMAGE", "shape": dims, "datatype": "UINT8", "data": [0] * size}],
            "outputs": [{"name": "CLASS" if model == GATE else "PROBS"}]}
    if model == GATE:
        body["parameters"] = {"threshold": 1.0}  # every row goes on to big: the whole path answers
    answer = _call(f"{base}/v2/models/{model}/infer", timeout, body)
    if not answer.get("outputs"):
        raise RuntimeError(f"no outputs in {answer}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="Triton's HTTP address")
    parser.add_argument("--models", default="little,big,littlebig", help="models to send the canary through")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    args = parser.parse_args()
    base = args.url if "://" in args.url else f"http://{args.url}"
    for model in args.models.split(","):
        try:
            canary(base.rstrip("/"), model, args.timeout)
        except (urllib.error.URLError, OSError, ValueError, KeyError, StopIteration, RuntimeError) as err:
            detail = err.read().decode(errors="replace") if isinstance(err, urllib.error.HTTPError) else err
            print(f"canary: model '{model}' did not answer: {detail}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
