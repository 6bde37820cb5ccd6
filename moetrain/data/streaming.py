"""Hub datasets read as a stream (``data.streaming=true``): nothing is downloaded whole.

``load_dataset(source, hub_config, streaming=True)`` gives ``datasets.IterableDataset``
splits that the sharded tokeniser (:func:`~moetrain.data.shards.write_split`) reads
batch by batch, resuming an interrupted build with ``skip``. The split and the documents
are those of the non-streaming path: the dataset's ``validation`` split when it has one,
otherwise row r of ``train`` (key ``train:r``, counted before empty documents are dropped)
goes to validation iff its seeded hash is below ``val_fraction``. Only the rule that moves
one document to an empty side needs the whole corpus, so a stream does not apply it.
"""

from __future__ import annotations

from typing import Any

from moetrain.config import DataConfig
from moetrain.data.errors import DataError, _first_line, _hash_unit


def _non_empty(batch: dict[str, list]) -> list[bool]:
    return [bool(t and t.strip()) for t in batch["text"]]


def _text_only(ds: Any, text_field: str, where: str) -> Any:
    """Keep only ``text_field`` (renamed ``text``), checking it exists when the stream knows its columns."""
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"data.text_field={text_field!r}: no such column in {where} (columns: {', '.join(columns)})")
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def load_streaming(cfg: DataConfig) -> tuple[Any, Any]:
    """``(train, val)`` ``datasets.IterableDataset`` of the hub dataset ``cfg.source`` (column ``text``)."""
    import datasets

    name = f"{cfg.source}" + (f" ({cfg.hub_config})" if cfg.hub_config else "")
    try:
        dd = datasets.load_dataset(cfg.source, cfg.hub_config, streaming=True)
    except Exception as exc:
        raise DataError(f"data.source={cfg.source!r}: cannot stream hub dataset {name} ({_first_line(exc)})") from exc
    if "train" not in dd:
        raise DataError(f"data.source={cfg.source!r}: hub dataset {name} has no train split (has {list(dd)})")
    train = _text_only(dd["train"], cfg.text_field, f"{name} split train")
    if "validation" in dd:
        val = _text_only(dd["validation"], cfg.text_field, f"{name} split validation")
        return train.filter(_non_empty, batched=True), val.filter(_non_empty, batched=True)

    def side(want_val: bool):  # type: ignore[no-untyped-def]
        def keep(batch: dict[str, list], rows: list[int]) -> list[bool]:
            return [(_hash_unit(cfg.seed, f"train:{r}") < cfg.val_fraction) == want_val for r in rows]

        return train.filter(keep, with_indices=True, batched=True).filter(_non_empty, batched=True)

    return side(False), side(True)
