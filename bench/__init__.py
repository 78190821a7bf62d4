"""medcot's benchmarks, one module per measurement; run from the repository root as `python -m bench.<name>`.

bench/README.md lists what each one measures and its last result (docs/results/, named date_gpu_what).
Nothing here is imported by medcot itself.
"""
