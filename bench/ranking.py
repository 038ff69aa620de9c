"""The recommender's ranking (`services.recommender.ranking.rank`): native vs the numpy formula.

    .venv/bin/python bench/ranking.py [--items 10000] [--factors 64] [--k 10] [--rounds 4000]
                                      [--cold-rounds 1000] [--evict-mb 64] [--gap-ms 5]

In-process, one thread, random float32 factors, a warm user (20 interactions: the
popularity blend is on) with 20 seen items excluded, k = 10. Per call, in microseconds:

- warm: calls back to back (factors and code in the caches);
- cold: before each call a `--evict-mb` buffer is written (more than the 32 MB L3: what
  other requests, processes and the kernel do to the caches between two requests at 1,000
  req/s), then `--gap-ms` is spun; a second cold run only spins `--gap-ms` (the other
  processes on the machine evict what they can meanwhile).

`native` is `rank` (streams._native.ScoreIndex: int8 bounds + exact f32 rescoring of the
few rows that can reach the top k), `numpy` is `rank_numpy` (`factors @ v`, min-max blend,
`top_k`: the reference); `index` is the native query alone, without rank's Python around it.
Also printed: the native coarse kernel (the best this CPU runs) and the fast path's mean
rescored rows per call.
Last line: native_warm_us=… native_cold_us=… numpy_warm_us=… numpy_cold_us=… (means, evicted cold)
"""
from __future__ import annotations

import argparse

from threadpoolctl import threadpool_limits

from services.recommender.ranking import benchmark
from streams._native import ScoreIndex


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4_000)
    parser.add_argument("--cold-rounds", type=int, default=1_000)
    parser.add_argument("--evict-mb", type=int, default=64)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    args = parser.parse_args()
    threadpool_limits(1, "blas")  # as the recommender runs (services/recommender/app.py)
    shape = dict(n_items=args.items, factors=args.factors, k=args.k, rounds=args.rounds,
                 cold_rounds=args.cold_rounds)
    evicted = benchmark(**shape, evict_mb=args.evict_mb)
    gapped = benchmark(**shape, evict_mb=0, gap_ms=args.gap_ms)
    kernels = ScoreIndex.kernels()
    print(f"{args.items} items x {args.factors} factors, k={args.k}, 20 seen, blend on; µs per call; "
          f"native kernel {kernels[-1]} (this CPU: {', '.join(kernels)})")
    print(f"{'':24}{'mean':>9}{'p50':>9}{'p99':>9}")
    rows = [("top_k (numpy, alone)", evicted, "top_k"),
            ("native warm", evicted, "rank"), ("native index warm", evicted, "index"),
            ("numpy warm", evicted, "numpy"),
            (f"native cold {args.evict_mb} MB", evicted, "rank_cold"),
            (f"native index cold {args.evict_mb} MB", evicted, "index_cold"),
            (f"numpy cold {args.evict_mb} MB", evicted, "numpy_cold"),
            (f"native cold {args.gap_ms:g} ms gap", gapped, "rank_cold"),
            (f"native index {args.gap_ms:g} ms gap", gapped, "index_cold"),
            (f"numpy cold {args.gap_ms:g} ms gap", gapped, "numpy_cold")]
    for label, out, name in rows:
        print(f"{label:24}{out[name + '_mean_us']:9.1f}{out[name + '_p50_us']:9.1f}{out[name + '_p99_us']:9.1f}")
    print(f"fast path share {evicted['rank_fast_share']:.2f}, rescored rows per call "
          f"{evicted['rank_rescored_mean']:.1f} of {args.items}")
    print(f"native_warm_us={evicted['rank_mean_us']:.1f} native_cold_us={evicted['rank_cold_mean_us']:.1f} "
          f"numpy_warm_us={evicted['numpy_mean_us']:.1f} numpy_cold_us={evicted['numpy_cold_mean_us']:.1f}")


if __name__ == "__main__":
    main()
