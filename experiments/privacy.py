"""Gradient-inversion study: what an attacker recovers from LoRA vs CE-LoRA updates (METHOD.md §8).

The victim is the shipped MiniLM classifier with adapters on every encoder linear layer, on
real movie-review batches (the first ``length`` tokens of each review). Threat settings,
same batches and the same optimization budget for each:

* ``fedavg_lora``: the attacker sees the gradients of A and B and knows every weight (a);
* ``celora_unknown_ab``: it sees only the cores' gradients and uses its own random draw
  for the client's A and B (b);
* ``celora_known_ab``: it sees only the cores' gradients but knows A and B (c, worst case);
* ``full``: full fine-tuning, the gradients of every encoder weight and the head (the
  word-embedding table is left out: its non-zero rows name the tokens outright).

The victim's adapters are drawn at a trained-like scale (A, B ~ N(0, 0.02²), C = I plus
N(0, 0.02²)) so that no gradient is identically zero (with B = 0, C's gradient is).

    python experiments/privacy.py                  # writes experiments/results/privacy/
    python experiments/privacy.py --smoke          # tiny budget, for CI
    python experiments/privacy.py --model-dir DIR  # another local HF BERT-family model

Output: ``results.jsonl`` (one line per setting, batch size and batch), ``results.md`` (the
table) and ``recovery.png``. [CLS] and [SEP] are not counted as recovered tokens.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from celora_jax import AdapterConfig, init_adapters
from celora_jax.data.text import load_text_dataset
from celora_jax.models import loading
from celora_jax.privacy import attack

SETTINGS = ("fedavg_lora", "celora_unknown_ab", "celora_known_ab", "full")
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "privacy"


def _with_factors(lora, key, names, scale=0.02):
    """Redraws the given factors of every adapter as N(0, scale²) (C as I + that)."""
    flat = traverse_util.flatten_dict(lora)
    keys = iter(jax.random.split(key, len(flat)))
    out = {}
    for path, value in flat.items():
        if path[-1] in names:
            noise = scale * jax.random.normal(next(keys), value.shape)
            value = (jnp.eye(value.shape[0]) + noise) if path[-1] == "C" else noise
        out[path] = value
    return traverse_util.unflatten_dict(out)


def _observed(setting):
    """Picks the leaves the attacker observes from {"params", "lora"}."""
    def pick(weights):
        if setting == "full":
            flat = traverse_util.flatten_dict(weights["params"])
            return traverse_util.unflatten_dict(
                {("params",) + p: v for p, v in flat.items() if "word_embeddings" not in p})
        names = ("A", "B") if setting == "fedavg_lora" else ("C",)
        flat = traverse_util.flatten_dict(weights["lora"])
        return traverse_util.unflatten_dict({("lora",) + p: v for p, v in flat.items() if p[-1] in names})
    return pick


def run_study(batch_sizes, length, batches_per_size, config: attack.AttackConfig, seed: int, out: pathlib.Path,
              settings=SETTINGS, model_dir: pathlib.Path | None = None) -> list[dict]:
    model_dir = loading.default_model_dir() if model_dir is None else pathlib.Path(model_dir)
    tokenizer = loading.load_tokenizer(model_dir)
    # [CLS] and [SEP] open and close every example: no secret, so not counted as recovered.
    special = tuple(i for i in (tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")) if i is not None)
    dataset = load_text_dataset()
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    records = []
    out.mkdir(parents=True, exist_ok=True)
    # The same victim model in every setting (loaded once: only its adapters differ).
    model, params = loading.load_classifier(model_dir, jax.random.key(seed), num_labels=2)
    with open(out / "results.jsonl", "w") as handle:
        for kind_setting in settings:
            kind = "lora" if kind_setting == "fedavg_lora" else "tri"
            adapter_config = AdapterConfig(kind=kind, rank=8)
            lora = init_adapters(jax.random.key(seed + 1), params, adapter_config)
            lora = _with_factors(lora, jax.random.key(seed + 2), ("A", "B", "C"))
            victim = {"params": params, "lora": lora}
            believed = victim
            if kind_setting == "celora_unknown_ab":
                believed = {"params": params, "lora": _with_factors(lora, jax.random.key(seed + 99), ("A", "B"))}
            table = params["backbone"]["embeddings"]["word_embeddings"]["embedding"]
            offsets = attack.classifier_offsets(params, length)
            for batch_size in batch_sizes:
                for repeat in range(batches_per_size):
                    rows = rng.choice(len(dataset.texts), batch_size, replace=False)
                    encoded = loading.encode_texts(tokenizer, [dataset.texts[i] for i in rows], length)
                    ids, mask = jnp.asarray(encoded["input_ids"]), jnp.asarray(encoded["attention_mask"])
                    labels = dataset.labels[rows]
                    gradient_fn = attack.classifier_gradient_fn(model, ids.shape, mask, _observed(kind_setting))
                    # Jitted: run eagerly, the gradient compiles each of its ops on its own.
                    observed = jax.jit(gradient_fn)(table[ids], jax.nn.one_hot(labels, 2), victim)
                    started = time.perf_counter()
                    key, attack_key = jax.random.split(key)
                    result = attack.invert_gradients(gradient_fn, observed, believed,
                                                     (batch_size, length, table.shape[1]), 2, table,
                                                     attack_key, config, offsets)
                    metrics = attack.recovery_metrics(ids, result.tokens, mask, labels, result.label_logits,
                                                      result.positions, table[ids], result.embeddings, offsets,
                                                      ignore_tokens=special)
                    record = {"setting": kind_setting, "batch_size": batch_size, "repeat": repeat,
                              "length": length, **metrics,
                              "matching_loss": float(result.matching_loss),
                              "observed_numbers": int(sum(x.size for x in jax.tree.leaves(observed))),
                              "seconds": time.perf_counter() - started,
                              "steps": config.steps, "restarts": config.restarts}
                    records.append(record)
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()
                    print(json.dumps(record), flush=True)
    return records


def write_report(records: list[dict], out: pathlib.Path, command: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in records)]
    sizes = sorted({r["batch_size"] for r in records})
    lines = [f"Command: `{command}`", "",
             "| setting | batch | token recovery | in position | embedding cos | label acc. | matching loss | numbers observed |",
             "|---|---|---|---|---|---|---|---|"]
    curves = {}
    for setting in settings:
        for size in sizes:
            rows = [r for r in records if r["setting"] == setting and r["batch_size"] == size]
            if not rows:
                continue
            mean = lambda k: float(np.mean([r[k] for r in rows]))
            curves.setdefault(setting, []).append((size, mean("token_recovery")))
            lines.append(f"| {setting} | {size} | {mean('token_recovery'):.2f} | {mean('token_accuracy'):.2f} | "
                         f"{mean('embedding_cosine'):.2f} | {mean('label_accuracy'):.2f} | "
                         f"{mean('matching_loss'):.3f} | {rows[0]['observed_numbers']:,} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for setting, points in curves.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=setting)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size")
    axis.set_ylabel("token recovery (position-free)")
    axis.set_ylim(0, 1.02)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "recovery.png", dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="batch 1, 8 tokens, 20 steps, 1 restart")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--length", type=int, default=16, help="tokens per review (with [CLS]/[SEP])")
    parser.add_argument("--batches", type=int, default=1, help="batches per batch size")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--restarts", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=str(RESULTS))
    parser.add_argument("--model-dir", default=None,
                        help="a local Hugging Face BERT-family directory (default: the shipped MiniLM)")
    args = parser.parse_args(argv)
    if args.model_dir is not None:
        try:  # a wrong directory is a usage error, reported before any model is built
            loading.read_encoder_config(args.model_dir)
        except loading.ModelLoadError as error:
            parser.error(f"--model-dir: {error}")
    if args.smoke:
        sizes, length, config = [1], 8, attack.AttackConfig(steps=20, restarts=1, learning_rate=args.learning_rate)
    else:
        sizes = [int(s) for s in args.batch_sizes.split(",")]
        length = args.length
        config = attack.AttackConfig(steps=args.steps, restarts=args.restarts, learning_rate=args.learning_rate)
    out = pathlib.Path(args.output_dir)
    records = run_study(sizes, length, args.batches, config, args.seed, out, model_dir=args.model_dir)
    write_report(records, out, "python experiments/privacy.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
