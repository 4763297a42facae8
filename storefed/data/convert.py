"""Convert a public-format export (Amazon JSON lines, MovieLens u.data) into merchant directories.

Writes ``<out>/catalog.csv`` and one ``<out>/merchant-NNN/`` per merchant in StoreFed's merchant
file schema (see storefed/data/merchant_files.py), ready for `storefed merchant` or inspection.
Refuses a non-empty output directory, so nothing existing is overwritten.
"""

from __future__ import annotations

from pathlib import Path

from storefed.config.schema import DataConfig, ImportedDataConfig
from storefed.data.merchant_files import summarize, write_catalog, write_merchant_dir
from storefed.data.sources import load_simulated


def convert_to_merchant_dirs(
    data_cfg: DataConfig, seed: int, out_dir: str | Path, reviews_format: str = "csv"
) -> list[dict]:
    """Partition ``data_cfg``'s file into merchants and write them; returns per-merchant counts."""
    if not isinstance(data_cfg, ImportedDataConfig):
        raise ValueError("storefed import needs data=amazon or data=movielens (with data.path=<file>)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} is not empty: choose a new out_dir")
    # every merchant first, so that a bad input file is refused before anything is written
    loaded = [load_simulated(data_cfg, seed, partition) for partition in range(data_cfg.num_merchants)]
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for partition, (catalog, merchant) in enumerate(loaded):
        if partition == 0:
            write_catalog(catalog, out / "catalog.csv")
        write_merchant_dir(merchant, catalog, out / merchant.merchant_id, reviews_format=reviews_format)
        summaries.append(summarize(merchant))
    return summaries
