"""Speed and memory benchmarks of the MaskCMA model (`python -m benchmarks.run_all`); results in docs/benchmarks.md.

Modules: `common` (settings, interleaved timing, statistics, result files), `memory` (peak memory on CPU and GPU),
`sam2_sizes` (tiny / official Hiera-T / Hiera-L SAM2 configs), `image_workloads` (the image-side calls), one
`bench_*` module per benchmark, `run_all` (the entry point) and `report` (the tables of docs/benchmarks.md).
"""
