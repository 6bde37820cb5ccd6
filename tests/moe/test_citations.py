"""Every equation number cited in the MoE code and presets names its paper and exists in that paper.

The ranges below were checked against the papers' own numbering (issue 18, docs/replication.md
"Equation numbers"): DeepSeek-V2's MoE equations are (20)-(31) (eq. 12-20 are DeepSeekMoE's
numbering, arXiv 2401.06066, which the code once cited under DeepSeek-V2's name), DeepSeek-V3's
(12)-(20), Switch's (1)-(6), Shazeer et al.'s (1)-(11) with the load loss in appendix A, the
Loss-Free paper's (1)-(5) and ST-MoE's z-loss (5). A citation whose nearest preceding paper is not
one of these fails, so a new one gets checked and added here rather than guessed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(
    [
        *(ROOT / "moetrain" / "moe").glob("*.py"),
        *(ROOT / "moetrain" / "config").glob("*.py"),
        *(ROOT / "configs" / "moe").glob("*.yaml"),
    ]
)

PAPERS: list[tuple[str, re.Pattern[str], range]] = [
    ("DeepSeek-V2", re.compile(r"DeepSeek-V2|2405\.04434"), range(20, 32)),
    ("DeepSeek-V3", re.compile(r"DeepSeek-V3|2412\.19437"), range(12, 21)),
    ("Switch", re.compile(r"Switch|Fedus|2101\.03961"), range(1, 7)),
    ("Shazeer et al. 2017", re.compile(r"Shazeer|1701\.06538|Noisily-gated"), range(1, 12)),
    ("Loss-Free Balancing", re.compile(r"Wang et al\. 2024|2408\.15664|[Ll]oss-[Ff]ree"), range(1, 6)),
    ("ST-MoE", re.compile(r"ST-MoE|Zoph"), range(5, 6)),
]
CITATION = re.compile(r"\beqs?\. (\d+(?:\s*[-,]\s*\d+)*)")
WINDOW = 600  # characters before a citation searched for the paper it belongs to


def cited_numbers(text: str) -> list[int]:
    out: list[int] = []
    for part in re.split(r"\s*,\s*", text):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def scan(text: str) -> list[tuple[int, str, list[int]]]:
    """(line, paper, numbers) for every ``eq. N`` citation of ``text``, the paper being the nearest one named before it."""
    found = []
    for m in CITATION.finditer(text):
        before = text[max(0, m.start() - WINDOW) : m.start()]
        nearest, where = "", -1
        for name, pattern, _ in PAPERS:
            hits = list(pattern.finditer(before))
            if hits and hits[-1].start() > where:
                nearest, where = name, hits[-1].start()
        found.append((text.count("\n", 0, m.start()) + 1, nearest, cited_numbers(m.group(1))))
    return found


def wrong(found: list[tuple[int, str, list[int]]]) -> list[tuple[int, str, list[int]]]:
    ranges = {name: numbers for name, _, numbers in PAPERS}
    return [(line, paper, nums) for line, paper, nums in found if not paper or not set(nums) <= set(ranges[paper])]


def test_the_scan_finds_the_citations():
    papers = {paper for path in FILES for _, paper, _ in scan(path.read_text())}
    assert {"DeepSeek-V2", "DeepSeek-V3", "Switch", "Shazeer et al. 2017", "Loss-Free Balancing", "ST-MoE"} <= papers


def test_every_equation_citation_names_a_checked_paper_and_a_number_it_has():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: eq. {nums} of {paper or 'no known paper'}"
        for path in FILES
        for line, paper, nums in wrong(scan(path.read_text()))
    ]
    assert not bad, "\n".join(bad)


def test_the_old_deepseekmoe_numbering_is_caught():
    """What the code cited before the audit: DeepSeekMoE's numbers under DeepSeek-V2's name, and an unnamed paper."""
    old = "DeepSeek-V2 (arXiv 2405.04434) eq. 12-14: f_i = N / (K T) ...\nDeepSeek-V2 eq. 9 or sigmoid (DeepSeek-V3 eq. 15)"
    assert [paper for _, paper, _ in scan(old)] == ["DeepSeek-V2", "DeepSeek-V2", "DeepSeek-V3"]
    assert [(line, nums) for line, _, nums in wrong(scan(old))] == [(1, [12, 13, 14]), (2, [9])]
    assert wrong(scan("k = ceil(T c / N) (eq. 1)")) == [(1, "", [1])]
