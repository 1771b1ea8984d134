"""pipelines.shards.textio: inputs read as lines of bytes in ranges and parts, and their dead letters."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_sentences

from kogpt2.text import escape_bytes
from pipelines.counters import Count
from pipelines.shards import runs, textio


def read_range_outputs(reader: textio.ReadLines, rng: tuple[str, int, int]) -> dict[str, list[Any]]:
    """Run ReadLines.process on one range: lines (index, bytes), dead letters, stats, line count."""
    reader.setup()
    out: dict[str, list[Any]] = {"lines": [], "located": [], "rejected": [], "stats": [], "line_counts": []}
    for item in reader.process(rng):
        if isinstance(item, tuple):
            _, start, first, batch = item
            out["lines"] += [(first + k, raw) for k, raw in enumerate(batch)]
            out["located"] += [(start, first + k, raw) for k, raw in enumerate(batch)]
        elif item.tag == textio.ReadLines.REJECTED:
            out["rejected"] += [json.loads(r[runs.RECORD_HEAD :]) for r in item.value[textio.REJECTED_FILE]]
        else:
            out[item.tag].append(item.value)
    return out


def test_read_ranges_yield_every_line_once_in_order(tmp_path: Path) -> None:
    lines = [f"{i} " + "가나다" * (i % 7) for i in range(300)] + ["", "긴 줄 " * 400, "끝"]
    data = ("\r\n".join(lines[:100]) + "\r\n" + "\n".join(lines[100:])).encode()  # CRLF and LF, no final newline
    path = tmp_path / "lines.txt"
    path.write_bytes(data)
    reader = textio.ReadLines(batch_size=17)
    reader.setup()
    ranges = textio.plan_ranges(str(path), len(data), parts=13, min_bytes=100)
    assert len(ranges) == 13 and ranges[0][1] == 0 and ranges[-1][2] == len(data)
    got: list[tuple[int, int, bytes]] = []
    counts = {}
    for rng in ranges:
        for out in reader.process(rng):
            if isinstance(out, tuple):
                _, start, first, batch = out
                got += [(start, first + k, raw) for k, raw in enumerate(batch)]
            elif out.tag == textio.ReadLines.LINE_COUNTS:
                counts[out.value[1]] = out.value[2]
    assert [raw for _, _, raw in got] == [line.encode() for line in lines]
    assert sum(counts.values()) == len(lines)
    gz = tmp_path / "lines.txt.gz"
    gz.write_bytes(gzip.compress(data))
    assert textio.plan_ranges(str(gz), gz.stat().st_size) == [(str(gz), 0, -1)]
    whole = [o for o in reader.process((str(gz), 0, -1)) if isinstance(o, tuple)]
    assert [raw for *_, batch in whole for raw in batch] == [line.encode() for line in lines]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64, 1 << 16])
def test_iter_lines_ends_lines_at_lf_crlf_and_lone_cr(chunk: int) -> None:
    import io

    data = b"a\rb\r\nc\nd\r\re\n\nlong-line-here\rlast"
    got = list(textio.iter_lines(io.BytesIO(data), 8, chunk))
    assert [line for _, line, _ in got] == [b"a", b"b", b"c", b"d", b"", b"e", b"", b"long-line-here", b"last"]
    assert [n for _, _, n in got] == [1, 1, 1, 1, 0, 1, 0, 14, 4]
    assert sum(consumed for consumed, _, _ in got) == len(data)  # every byte belongs to one line
    assert list(textio.iter_lines(io.BytesIO(b"x\r"), 8, chunk)) == [(2, b"x", 1)]  # a final lone \r ends a line


def test_a_line_with_no_end_is_read_in_bounded_memory() -> None:
    import io
    import tracemalloc

    class Endless(io.RawIOBase):  # 20 MB of one line, produced on the fly (no copy in the test either)
        def __init__(self, size: int) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            n = min(len(b), self.left)
            b[:n] = b"x" * n
            self.left -= n
            return n

    tracemalloc.start()
    try:
        got = list(textio.iter_lines(io.BufferedReader(Endless(20 << 20)), 1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(n, len(line)) for _, line, n in got] == [(20 << 20, textio.PREFIX_BYTES)]
    assert peak < 4 << 20, peak  # the 1 MiB limit plus a read chunk, not the 20 MB line


def test_read_ranges_with_lone_cr_and_too_long_lines_count_every_line_once(tmp_path: Path) -> None:
    lines = [f"{i} " + "가나다" * (i % 5) for i in range(120)]
    lines[40] = "긴" * 400  # 1200 bytes: over the limit
    ends = ["\r", "\n", "\r\n"]
    data = "".join(line + ends[i % 3] for i, line in enumerate(lines)).encode()
    path = tmp_path / "mixed.txt"
    path.write_bytes(data)
    reader = textio.ReadLines(batch_size=7, files=[str(path)], max_line_bytes=1000)
    for parts in (1, 7, 29):
        got, rejected, counted = [], [], 0
        for rng in textio.plan_ranges(str(path), len(data), parts=parts, min_bytes=50):
            out = read_range_outputs(reader, rng)
            got += [raw for _, raw in out["lines"]]
            rejected += out["rejected"]
            counted += sum(n for *_, n in out["line_counts"])
        assert counted == len(lines)
        assert got == [line.encode() for i, line in enumerate(lines) if i != 40]
        assert [(r["reason"], r["raw"]) for r in rejected] == [("too_long", escape_bytes(lines[40].encode()[:64]))]
        assert "1200 bytes" in rejected[0]["detail"]


def test_line_blocks_are_the_lines_of_iter_lines() -> None:
    import io
    import random

    rng = random.Random(0)
    pieces = [b"a", b"bb", b"\r", b"\n", b"\r\n", b"xyz" * 4, b"\xea\xb0\x80"]
    for _ in range(400):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        limit, chunk = rng.choice([1, 3, 8, 100]), rng.choice([1, 2, 3, 5, 64])
        expected = [(line, n) for _, line, n in textio.iter_lines(io.BytesIO(data), limit)]
        chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        got = [
            (line, long.get(i, len(line)))
            for lines, long in textio.iter_line_blocks(chunks, limit)
            for i, line in enumerate(lines)
        ]
        assert got == expected, (data, limit, chunk)


def test_a_compressed_file_read_in_parts_gives_every_line_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(textio, "PART_LINES", 7)
    lines = [f"{i} 문장" for i in range(100)]
    lines[30] = "긴" * 400  # over the limit, in the fifth block
    data = "".join(line + ("\r\n" if i % 2 else "\n") for i, line in enumerate(lines)).encode()
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress(data))
    for parts in (1, 2, 3):
        ranges = textio.plan_ranges(str(path), path.stat().st_size, compressed_parts=parts)
        assert ranges == [(str(path), p, -parts) for p in range(parts)]
        got, rejected, counts = [], [], []
        for rng in ranges:
            out = read_range_outputs(textio.ReadLines(3, [str(path)], max_line_bytes=1000), rng)
            got += out["located"]
            rejected += out["rejected"]
            counts += out["line_counts"]
        # segments are blocks of 7 lines, numbered by their first line
        assert sorted((start + index, raw) for start, index, raw in got) == [
            (i, line.encode()) for i, line in enumerate(lines) if i != 30
        ]
        assert sorted(counts) == [(str(path), s, min(7, 100 - s)) for s in range(0, 100, 7)]
        assert [(r["reason"], r["start"] + r["index"]) for r in rejected] == [("too_long", 30)]
        written = textio.write_rejected(str(tmp_path / f"r{parts}.jsonl"), [json.dumps(r) for r in rejected], counts)
        assert written["examples"] == 1
        assert json.loads((tmp_path / f"r{parts}.jsonl").read_text())["line"] == 31
    # a truncated file read in parts: the same lines as in one part, one corrupt_input letter in all
    cut = tmp_path / "cut.txt.gz"
    whole = gzip.compress(("\n".join(make_sentences(400)) + "\n").encode())
    cut.write_bytes(whole[: len(whole) // 2])
    seen = {}
    for parts in (1, 3):
        outs = [
            read_range_outputs(textio.ReadLines(5, [str(cut)]), rng)
            for rng in textio.plan_ranges(str(cut), len(whole) // 2, compressed_parts=parts)
        ]
        seen[parts] = sorted(x for o in outs for x in o["located"])
        assert [r["reason"] for o in outs for r in o["rejected"]] == ["corrupt_input"]
        assert sum(n for o in outs for *_, n in o["line_counts"]) == len(seen[parts]) > 7
    assert seen[1] == seen[3]


def test_truncated_gzip_is_a_corrupt_input_dead_letter(tmp_path: Path) -> None:
    sentences = make_sentences(400)
    whole = gzip.compress(("\n".join(sentences) + "\n").encode())
    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # an interrupted upload
    reader = textio.ReadLines(batch_size=50, files=[str(cut)])
    out = read_range_outputs(reader, (str(cut), 0, -1))
    kept = [raw.decode() for _, raw in out["lines"]]
    assert kept == sentences[: len(kept)]  # only whole lines from before the cut: no partial last line
    (letter,) = out["rejected"]
    assert letter["reason"] == "corrupt_input" and letter["index"] == textio.FILE_LEVEL
    assert f"{len(kept)} lines read" in letter["detail"]
    (stats,) = out["stats"]
    assert stats.counts[Count.CORRUPT_INPUTS] == 1 and stats.corrupt_inputs == (str(cut),)
    assert stats.counts[Count.LINES_READ] == len(kept) and out["line_counts"] == [(str(cut), 0, len(kept))]
    # an intact multi-member gzip and a bzip2 file read whole, with no dead letter
    good = tmp_path / "good.txt.gz"
    good.write_bytes(gzip.compress("\n".join(sentences[:5]).encode()) + gzip.compress(("\n" + sentences[5]).encode()))
    out = read_range_outputs(textio.ReadLines(10, [str(good)]), (str(good), 0, -1))
    assert [raw.decode() for _, raw in out["lines"]] == sentences[:6] and not out["rejected"]
    import bz2

    bad_bz2 = tmp_path / "bad.txt.bz2"
    bad_bz2.write_bytes(bz2.compress(("\n".join(sentences) + "\n").encode())[:-40])
    out = read_range_outputs(textio.ReadLines(10, [str(bad_bz2)]), (str(bad_bz2), 0, -1))
    assert [r["reason"] for r in out["rejected"]] == ["corrupt_input"]
