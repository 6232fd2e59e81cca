"""What a cell produces, typed: one `SampleRecord` per sample and a `CellResult` per cell.

The field names are the names everything downstream uses: `samples.jsonl` (each line a record's
`to_json()`), the aggregation in `harness.measure`, the MLflow metrics of a cell (`CellResult.metrics`
keys, listed in `METRICS`) and the report's columns (`metrics.<name>` in MLflow's tables).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

TIMES = ("vision_ms", "select_ms", "prefill_ms", "ttft_ms", "e2e_ms")  # per timed pass, with decode_ms
GPU_TIMES = ("gpu_vision_ms", "gpu_prefill_ms", "gpu_decode_ms")  # CUDA-event stage times (GPU only)


@dataclass
class SampleRecord:
    """One sample of a cell: its answer, score, per-repeat timings and what the model processed."""
    uid: str
    score: float
    prediction: str
    decode_tokens: int  # tokens decoded after the first-token time (decode speed counts these)
    timings: list[dict]  # one dict per timed repeat: TIMES + decode_ms
    qtype: str = ""
    question: str = ""
    answer: str = ""
    tokens: list[int] = field(default_factory=list)
    new_tokens: int = 0
    equal_token_average: float = 0.0  # visual tokens per layer, averaged over layers (measured)
    prefill_gflops: float = 0.0
    kv_cache_mb: float = 0.0
    visual_per_layer: list[int] = field(default_factory=list)
    keep: dict = field(default_factory=dict)  # after-layer -> visual tokens kept ("-1": before the LLM)
    merged: dict = field(default_factory=dict)  # after-layer -> {merged token: the patches in it}
    # timing.paired: the baseline timed right before each repeat of this sample
    baseline_timings: list[dict] | None = None
    baseline_decode_tokens: int | None = None
    # timing.subset: False for a sample outside the timed subset (one pass, for its answer; its
    # one timing is not used by any speed figure)
    timed: bool = True
    # self-speculative decoding
    target_forwards: int | None = None
    drafted: int | None = None
    accepted: int | None = None
    rounds: int | None = None
    # the physical bound of this sample's work on the device (harness.roofline): its prefill, and
    # greedy decoding of its decode_tokens; roofline_fraction = bound / measured
    bound_prefill_ms: float | None = None
    bound_decode_ms: float | None = None

    def to_json(self) -> dict:
        """The record as a `samples.jsonl` line (fields that do not apply left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> "SampleRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def paired_reference(self) -> "SampleRecord":
        """The baseline's timings taken beside this sample (timing.paired), as a record."""
        return SampleRecord(self.uid, float("nan"), "", self.baseline_decode_tokens, self.baseline_timings,
                            timed=self.timed and self.baseline_timings is not None)


@dataclass
class CellResult:
    cell: object  # harness.experiment.Cell
    params: dict  # logged as MLflow params
    metrics: dict  # logged as MLflow metrics; names in METRICS (+ accuracy_<question type>)
    records: list[SampleRecord]
    start_ms: int = 0  # wall-clock start and end of the cell (ms since the epoch): the run's times
    end_ms: int = 0
    artifacts: dict = field(default_factory=dict)  # extra artifacts of the run: file name -> text


def _with_interval(name: str) -> tuple[str, ...]:
    return (name, f"{name}_ci_low", f"{name}_ci_high")


METRICS = (
    # the cell's own (harness.cell.aggregate, harness.measure.timing_metrics)
    "accuracy", "samples", *TIMES, *GPU_TIMES, "decode_tokens_per_s_pooled", "decode_tokens_per_s_mean",
    *(f"{t}_spread" for t in (*TIMES, *GPU_TIMES, "decode_tokens_per_s_pooled", "decode_tokens_per_s_mean")),
    "repeats",
    "equal_token_average", "prefill_gflops", "kv_cache_mb", "target_forwards_per_token",
    "acceptance_rate", "mean_accepted_length", "peak_rss_mb", "peak_gpu_allocated_mb", "repeat_token_mismatches",
    "roofline_fraction", "prefill_roofline_fraction", "decode_roofline_fraction",
    # against the baseline (harness.measure.relative_metrics)
    "relative_accuracy", "agreement_with_baseline", *_with_interval("accuracy_diff"),
    *_with_interval("prefill_speedup"), *_with_interval("ttft_speedup"), *_with_interval("e2e_speedup"),
    *_with_interval("decode_speedup"),
)
