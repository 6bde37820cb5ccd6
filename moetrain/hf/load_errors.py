"""One line for a transformers folder that does not load (``moetrain-export --from-hf``).

``from_pretrained`` reports a bad folder in several ways: an ``OSError`` without an errno for a
missing weights file or a ``config.json`` that is not JSON
(``transformers/configuration_utils.py::_get_config_dict``, ``modeling_utils.py::
_get_resolved_checkpoint_files``), a ``ValueError`` for a config it cannot read, and, for tensors
whose shapes differ from what ``config.json`` implies (a changed intermediate size, an expert
missing from a fused tensor), a ``RuntimeError`` that points at a table it logged just before
(``transformers/utils/loading_report.py::log_state_dict_report``). :func:`quiet_transformers`
keeps that table (and the progress bar) off the terminal and :func:`hf_load_error` turns the
failure into one :class:`~moetrain.hf.mapping.ExportError` line naming the folder and the
mismatched tensors. Anything else stays a bug with its traceback.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moetrain.errors import one_line
from moetrain.hf.mapping import ExportError

LOADING_FAILURES = ("ignore_mismatched_sizes", "Error(s) in loading state_dict", "automatic conversion of the weights")
"""Phrases of the ``RuntimeError`` messages with which transformers' loading report refuses a checkpoint."""
ANSI = re.compile(r"\x1b\[[0-9;]*m")
ROW = re.compile(r"^(.+?)\s*\|\s*(MISMATCH|MISSING|UNEXPECTED|CONVERSION)\b(.*)$")
SIZES = re.compile(r"ckpt: torch\.Size\((\[[^]]*\])\) vs model: ?torch\.Size\((\[[^]]*\])\)")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(ANSI.sub("", record.getMessage()))


@contextmanager
def quiet_transformers() -> Iterator[list[str]]:
    """Within: transformers' progress bars off and its warnings collected into the yielded list instead of
    printed; on leaving normally they are printed (as transformers would have), on an error they are not
    (:func:`hf_load_error` summarises them)."""
    from transformers.utils import logging as hf_logging

    capture = _Capture()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.add_handler(capture)
    try:
        yield capture.messages
    finally:
        hf_logging.remove_handler(capture)
        hf_logging.enable_default_handler()
        if bars:
            hf_logging.enable_progress_bar()
    for message in capture.messages:
        print(message, file=sys.stderr)


def report_rows(messages: list[str]) -> list[str]:
    """``KEY (STATUS)`` of each row of transformers' logged loading report."""
    rows = []
    for message in messages:
        for line in message.splitlines():
            m = ROW.match(line.strip())
            if not m:
                continue
            sizes = SIZES.search(m.group(3))
            what = f"file {sizes.group(1)} vs config.json {sizes.group(2)}" if sizes else m.group(2).lower()
            rows.append(f"{m.group(1)} ({what})")
    return rows


def raised_by_transformers(e: BaseException) -> bool:
    """Whether ``e`` was raised inside the transformers package (its traceback's innermost frame)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/transformers/" in Path(tb.tb_frame.f_code.co_filename).as_posix()


def hf_load_error(src: str | Path, e: BaseException, messages: list[str]) -> ExportError | None:
    """The one-line :class:`ExportError` for a transformers folder that failed to load with ``e`` (``None``:
    not a loading failure, i.e. a bug)."""
    if isinstance(e, ExportError) or not raised_by_transformers(e):
        return None
    if isinstance(e, OSError) and e.errno is None:  # transformers' "no file named ...", "not a valid JSON file"
        return ExportError(f"{src}: cannot load it with transformers: {one_line(str(e))}")
    if isinstance(e, RuntimeError) and any(p in str(e) for p in LOADING_FAILURES):
        rows = report_rows(messages)
        named = f": {', '.join(rows[:6])}{' ...' if len(rows) > 6 else ''}" if rows else ""
        return ExportError(
            f"{src}: its tensors do not match its config.json (a changed size, or an expert missing){named}"
        )
    if isinstance(e, ValueError | KeyError):  # a config.json transformers cannot read
        return ExportError(f"{src}: cannot load it with transformers: {one_line(str(e))}")
    return None
