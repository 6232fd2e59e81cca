"""The speed-regression gate: pytest-benchmark timings of the embedded model, each method timed
interleaved with its baseline so that the gate reads a ratio, and clock-free proxies.

`expected.json` (next to this file, reviewed like code) holds per benchmark the expected speedup
ratio and the proxies; `tolerance` is how far below the expected ratio a measured one may fall.
`pytest tests/bench --bench-update` (`make bench-baseline`) writes the measured values there
instead of checking them, keeping the tolerance.
"""
from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

EXPECTED = Path(__file__).with_name("expected.json")
WARMUP = 1  # untimed rounds before the timed ones, in every benchmark


@dataclass
class Ratio:
    """A method's speedup over its baseline from interleaved rounds: the median of the per-round
    ratios, with their quartiles as the spread."""
    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, per_round: list[float]) -> "Ratio":
        q = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else per_round * 3
        return cls(statistics.median(per_round), q[0], q[2], len(per_round))


def interleaved(benchmark, run, reference, rounds: int, warmup: int = WARMUP) -> tuple[list[float], list[float]]:
    """Seconds of `run` and of `reference` per round, `reference` right before `run` in every
    round (warm-up rounds dropped). pytest-benchmark times `run` (its stats, --benchmark-save and
    --benchmark-compare are about the method's own time); with --benchmark-disable the same rounds
    run without it."""
    times: dict[str, list[float]] = {"run": [], "reference": []}

    def timed(fn, key):
        t0 = time.perf_counter()
        out = fn()
        times[key].append(time.perf_counter() - t0)
        return out

    def setup():
        timed(reference, "reference")

    if benchmark.disabled:
        for _ in range(warmup + rounds):
            setup()
            timed(run, "run")
    else:
        benchmark.pedantic(lambda: timed(run, "run"), setup=setup, rounds=rounds, warmup_rounds=warmup)
    return times["run"][warmup:], times["reference"][warmup:]


class Gate:
    def __init__(self, update: bool):
        self.update = update
        self.expected = json.loads(EXPECTED.read_text()) if EXPECTED.is_file() else {}
        self.tolerance = self.expected.get("tolerance", 0.06)
        self.measured: dict = {"ratios": {}, "proxies": {}}

    def _expected(self, section: str, name: str):
        try:
            return self.expected[section][name]
        except KeyError:
            pytest.fail(f"{name}: no expected {section[:-1]} in {EXPECTED}; run `make bench-baseline` and review the diff")

    def check(self, benchmark, name: str, proxies: dict, ratio: Ratio | None = None) -> None:
        """Record the benchmark's figures (pytest-benchmark's extra_info) and fail, naming every
        miss at once, when a clock-free proxy differs from the expected one or the speedup falls
        below expected x (1 - tolerance)."""
        self.measured["proxies"][name] = proxies
        benchmark.extra_info.update(proxies)
        if ratio is not None:
            self.measured["ratios"][name] = round(ratio.median, 3)
            benchmark.extra_info.update({"speedup": ratio.median, "speedup_q1": ratio.low, "speedup_q3": ratio.high,
                                         "rounds": ratio.rounds})
        if self.update:
            return
        expected = self._expected("proxies", name)
        misses = [f"{name}: {key} is {value}, expected " + (repr(expected[key]) if key in expected else
                                                             "nothing (run `make bench-baseline`)")
                  for key, value in proxies.items() if value != expected.get(key)]
        if ratio is not None:
            want = self._expected("ratios", name)
            floor = want * (1 - self.tolerance)
            benchmark.extra_info.update({"expected_speedup": want, "floor": floor})
            if ratio.median < floor:
                misses.append(f"{name}: speedup {ratio.median:.3f}x (quartiles {ratio.low:.3f}-{ratio.high:.3f}, "
                              f"{ratio.rounds} rounds) is below the expected {want:.3f}x - "
                              f"{100 * self.tolerance:.0f} % = {floor:.3f}x")
        assert not misses, "\n".join(misses)

    def write(self) -> None:
        out = {"tolerance": self.tolerance, **{k: dict(sorted(v.items())) for k, v in self.measured.items()}}
        if self.expected:  # keep the entries of benchmarks that did not run (-k)
            for section in ("ratios", "proxies"):
                out[section] = dict(sorted({**self.expected.get(section, {}), **out[section]}.items()))
        text = json.dumps(out, indent=2)
        text = re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s+", " ", m.group()).replace("[ ", "[").replace(" ]", "]"), text)
        EXPECTED.write_text(text + "\n")
