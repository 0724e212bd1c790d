"""Summaries of py-spy raw profiles (``py-spy record --format raw``), as ``bench/pipeline.py --profile`` writes them.

    python -m bench.profiles DIR/live-flow.txt [--top 30] [--threads] [--thread MainThread]

Prints, per file: samples per thread, the functions with the most *self* time (leaf frames),
the functions with the most *inclusive* time (anywhere on the stack, counted once a sample),
and self time per source file. Frames look like ``function (path:line)``; paths are shortened
to the part after ``site-packages/`` or the repo root.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")
ROOT = str(Path(__file__).resolve().parent.parent) + "/"


def _short(path: str) -> str:
    for cut in ("site-packages/", ROOT, "lib/python3.11/"):
        i = path.find(cut)
        if i >= 0:
            return path[i + len(cut):]
    return path


def parse(path: Path):
    """Yield (thread, [(function, file), ...] root first, count)."""
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        parts = stack.split(";")
        thread = ""
        while parts and parts[0].startswith(("thread ", "process ")):
            thread = parts.pop(0)
        frames = []
        for p in parts:
            m = _FRAME.match(p)
            if m:
                frames.append((m.group("fn"), _short(m.group("file"))))
        yield thread, frames, int(n)


def summarize(path: Path, top: int = 25, by_thread: bool = False, only_thread: str = "") -> str:
    self_t: Counter = Counter()
    incl: Counter = Counter()
    files: Counter = Counter()
    threads: Counter = Counter()
    total = 0
    for thread, frames, n in parse(path):
        if only_thread and only_thread not in thread:
            continue
        total += n
        threads[thread] += n
        if not frames:
            self_t[("(no python frame)", "")] += n
            continue
        leaf = frames[-1]
        self_t[leaf] += n
        files[leaf[1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{path}: no samples"
    out = [f"== {path.name}{' [' + only_thread + ']' if only_thread else ''}: {total} samples"]
    if by_thread or len(threads) > 1:
        out.append("threads: " + ", ".join(f"{t or '?'} {n / total:.0%}" for t, n in threads.most_common(8)))
    out.append(f"-- self time (top {top})")
    out += [f"{n / total:6.1%}  {fn}  ({f})" for (fn, f), n in self_t.most_common(top)]
    out.append(f"-- inclusive time (top {top})")
    out += [f"{n / total:6.1%}  {fn}  ({f})" for (fn, f), n in incl.most_common(top)]
    out.append("-- self time by file (top 15)")
    out += [f"{n / total:6.1%}  {f}" for f, n in files.most_common(15)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.profiles")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--threads", action="store_true", help="print the share of every thread")
    ap.add_argument("--thread", default="", help="only samples of threads whose name contains this (e.g. MainThread)")
    args = ap.parse_args(argv)
    for p in args.files:
        print(summarize(p, args.top, args.threads, args.thread))
        print()


if __name__ == "__main__":
    main()
