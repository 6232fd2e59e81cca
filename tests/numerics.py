"""Float tolerances sized to what a test compares, and top-k selections that allow for ties.

Two fp32 computations of one quantity that differ only in the order of their sums (another
kernel: SDPA against eager attention, index_add against a Python mean; another thread count;
another SIMD width on another CPU) differ by at most about (n - 1) * u * sum|terms| for each sum of
n terms, with u = 2**-24 the fp32 unit roundoff (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2nd ed., section 4.2). Through a network the per-sum errors add up stage by stage.

`fp32_atol` turns that into an absolute tolerance: n is the longest reduction whose order differs
between the two sides, `depth` the number of such reductions one after another (a decoder layer
counts once: its sums run in sequence but each is bounded by the same n), and sum|terms| is stood
in for by the largest magnitude in the compared tensor (not a strict bound where terms cancel, but
n*u is itself the worst case of a sum whose rounding errors all align). What was measured on
a 2-core x86 machine with 1 and 2 threads sits 10-100x below it (numbers next to each use), while
a real error (a wrong row, a wrong member of a merge, a missing layer) is of the order of the
values themselves, far above it.

`rtol` is left at 0 throughout: a relative tolerance fails on elements near zero, whose absolute
error still scales with the tensor's magnitude, not their own (the VisionZip test that failed on
one element of 2,048 at 1.17e-5 > 1e-5 was such an element).
"""
from __future__ import annotations

import torch

U = 2.0 ** -24  # fp32 unit roundoff


def fp32_atol(reference: torch.Tensor, reduction: int, depth: int = 1) -> float:
    """The allowed absolute difference between two fp32 evaluations of `reference` whose `depth`
    successive sums of up to `reduction` terms run in different orders (see the module docstring)."""
    return depth * reduction * U * float(reference.detach().abs().max())


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, reduction: int, depth: int = 1) -> None:
    atol = fp32_atol(expected, reduction, depth)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0,
                               msg=lambda m: f"{m}\n(tolerance {atol:.3g}: {depth} x sums of {reduction} terms "
                                             f"in fp32 at magnitude {float(expected.abs().max()):.3g})")


def decoder_reduction(config, seq_len: int) -> int:
    """The longest sum inside one decoder layer: a projection over the hidden or MLP width, or
    attention over the sequence."""
    return max(config.hidden_size, config.intermediate_size, seq_len)


def topk_like(scores, k: int, atol: float, prefer=()) -> list[int]:
    """Sorted indices of a top-k of `scores`, with near-ties resolved like `prefer`.

    Scores within `atol` of the k-th largest are ties under float noise: which of them a correct
    implementation keeps depends on the order of its sums. Those in `prefer` (the implementation
    under test's choice) are taken first, then the rest by score. Every index outside the tie band
    is decided by the scores alone, so a wrong selection still differs from this one.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    kth = float(s.topk(k).values[-1])
    sure = (s > kth + atol).nonzero().flatten().tolist()
    band = ((s - kth).abs() <= atol).nonzero().flatten().tolist()
    preferred = set(int(i) for i in prefer)
    band.sort(key=lambda i: (i not in preferred, -float(s[i])))
    return sorted(sure + band[: k - len(sure)])
