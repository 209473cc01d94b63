"""carclf benchmarks: each ``bench_*.py`` prints figures as ratios against a baseline measured in the same run."""
