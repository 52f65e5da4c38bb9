"""Measurements: each module is a command, `python -m benchmarks.NAME --help`, run from the repository root.

Every benchmark prints (and writes, with --out / --json) its numbers together with the machine and package
versions they were measured on (compress.quality.cost.machine_info), and compares variants as ratios within
the same run. What builds shipped artifacts lives in scripts/ instead.

    fullscale           the full SD3-medium student with random weights: parameters, MACs, latency, memory
    compare_reference   quality of the shipped reference students beside bicubic (and what their VAE allows)
    texture_spectrum    periodic texture at the token period in a student's output
    tiled_vae           tiled vs untiled VAE (accuracy of each statistics choice) and a large upscale's memory/time
"""
