"""Review-encoder throughput: embedding reviews once vs reading them from the merchant's cache.

Embeds review texts (Amazon file when given, else a virtual store's) with the frozen encoder of
``task.encoder=frozen`` on the device ``choose_device`` picks, then reads the same features back
through the per-merchant disk cache in a fresh process state, and prints reviews per second for
both and their ratio, as one JSON line and a table.

    python -m storefed.simulations.embedding_throughput [--device auto|cpu|cuda] [--reviews N] [--amazon FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from storefed.client.device import choose_device
from storefed.models import embedding_cache
from storefed.models.text_encoder import load_encoder


def _texts(amazon: str | None, count: int) -> list[str]:
    if amazon:
        from storefed.data.importers import read_amazon_reviews

        return list(read_amazon_reviews(amazon)[1].text[:count])
    from storefed.data.virtual_stores import StoreGeneratorConfig, generate_store

    texts: list[str] = []
    store = 0
    while len(texts) < count:
        texts += generate_store(StoreGeneratorConfig(), store).reviews.text
        store += 1
    return texts[:count]


def measure(texts: list[str], device: torch.device, max_length: int, batch_size: int) -> dict:
    encoder = load_encoder(None, max_length, device)
    encoder.embed(texts[:batch_size], batch_size)  # warm-up
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        embedding_cache.cached_embeddings(encoder, texts, "bench-merchant", cache, batch_size)
        cold = time.perf_counter() - start
        embedding_cache.clear_memory()  # a later round in a new process: disk cache only
        start = time.perf_counter()
        embedding_cache.cached_embeddings(encoder, texts, "bench-merchant", cache, batch_size)
        warm = time.perf_counter() - start
    return {"reviews": len(texts), "max_length": max_length, "device": str(device),
            "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
            "embed_reviews_per_s": len(texts) / cold, "cached_reviews_per_s": len(texts) / warm,
            "cached_vs_embed_speedup": cold / warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reviews", type=int, default=2000)
    parser.add_argument("--amazon", default=None, help="Amazon reviews JSON(.gz): real review lengths")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    row = measure(_texts(args.amazon, args.reviews), choose_device(args.device), args.max_length, args.batch_size)
    print(json.dumps(row))
    print(f"| reviews | device | tokens max | embed reviews/s | cached reviews/s | cached / embed |\n| --- | --- | --- | --- | --- | --- |\n"
          f"| {row['reviews']} | {row['device_name']} | {row['max_length']} | {row['embed_reviews_per_s']:.1f} | "
          f"{row['cached_reviews_per_s']:.0f} | {row['cached_vs_embed_speedup']:.0f}x |")


if __name__ == "__main__":
    main()
