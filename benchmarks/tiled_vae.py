"""Tiled VAE: how close each way of sharing statistics comes to the untiled VAE, and what a large upscale costs.

Part 1, accuracy. A mid-size photo mosaic (four photos with different content, so GroupNorm statistics differ
from region to region) is upscaled x4 by the student with the VAE untiled (the reference) and with the VAE
tiled (`--vae-max-side` below the image size) using each way of getting image-wide statistics:

    whole        statistics of the whole image at full resolution (exact; memory of the untiled pass)
    sampled      statistics of windows sampled over the image (the toolkit's default; bounded memory)
    downsampled  statistics of the whole image shrunk to --vae-max-side (multidiffusion-upscaler's fast mode)
    diffusers    diffusers' own `AutoencoderKL.enable_tiling()` (per-tile statistics, blended overlaps)

The transformer's latent tiling is the same in every run, so the PSNR to the reference isolates the VAE.
Time and peak memory (VmHWM, reset before each run) are reported beside each.

Part 2, scale. `python -m compress upscale` runs in a fresh process on 1500x1000 -> 6000x4000 (and on a
quarter of that area, to show that time grows with the area and memory does not), reporting wall time and
peak RSS of the process.

    python -m benchmarks.tiled_vae --out docs/tiled-vae          # about 15 minutes on 2 CPU cores
    python -m benchmarks.tiled_vae --skip-large --size 1024x768  # accuracy only, a few minutes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PEAK_MARK = "PEAK_RSS_KB"
# Runs `python -m compress ARGS` in this process and reports its own peak RSS (Linux and macOS).
_CLI_WITH_PEAK = (
    "import resource, sys; from compress.__main__ import main; code = main(sys.argv[1:]); "
    f"print('{PEAK_MARK}', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(code)"
)


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def mosaic(width: int, height: int):
    """HR test image: four real photos (astronaut, coffee, rocket, chelsea), each resized into one quadrant."""
    import numpy as np
    from PIL import Image
    from skimage import data

    half_w, half_h = width // 2, height // 2
    photos = [data.astronaut(), data.coffee(), data.rocket(), data.chelsea()]
    canvas = np.zeros((height, width, 3), np.uint8)
    for index, photo in enumerate(photos):
        top, left = (index // 2) * half_h, (index % 2) * half_w
        canvas[top : top + half_h, left : left + half_w] = np.asarray(
            Image.fromarray(photo).resize((half_w, half_h), Image.BICUBIC))
    return canvas


def _reset_peak() -> bool:
    """Reset this process's VmHWM (Linux: writing 5 to /proc/self/clear_refs); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def accuracy(model_spec: str | None, size: tuple[int, int], max_side: int, tile: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from compress.models.resolve import load_model
    from compress.options import TileSettings, VAETiling
    from compress.pipeline import tiled_velocity
    from compress.quality.fidelity import psnr_y

    model = load_model(model_spec).model
    hr = mosaic(*size)
    lr_np = np.asarray(Image.fromarray(hr).resize((size[0] // 4, size[1] // 4), Image.BICUBIC))
    lr = torch.from_numpy(lr_np.copy()).permute(2, 0, 1)[None].float() / 255
    tiles = TileSettings()
    latent_tile = min(tiles.latent_tile, model.max_latent_side or tiles.latent_tile)

    def run(tiling, diffusers_tiling: bool = False):
        _reset_peak()
        start = time.perf_counter()
        with torch.no_grad():
            if diffusers_tiling:
                model.vae.enable_tiling()
            try:
                latent = model.encode(model.preprocess(lr), tiling=tiling)
                latent = latent - tiled_velocity(model, latent, latent_tile, tiles.latent_overlap)
                out = model.postprocess(model.decode(latent, tiling=tiling), lr.shape[-2:]).clamp(0, 1)
            finally:
                model.vae.disable_tiling()
        return out, time.perf_counter() - start, _peak_mb()

    reference, ref_seconds, ref_peak = run(None)
    rows = {"untiled": {"psnr_to_untiled_db": None, "seconds": ref_seconds, "peak_rss_mb": ref_peak}}
    for statistics in ("whole", "sampled", "downsampled"):
        tiling = VAETiling(tile=tile, pad=tiles.vae_pad, max_side=max_side, statistics=statistics)
        out, seconds, peak = run(tiling)
        rows[statistics] = {"psnr_to_untiled_db": float(psnr_y(out, reference)), "seconds": seconds,
                            "peak_rss_mb": peak}
        print(f"  {statistics:12s} PSNR to untiled {rows[statistics]['psnr_to_untiled_db']:6.2f} dB, "
              f"{seconds:6.1f} s, peak RSS {peak:.0f} MB", flush=True)
    out, seconds, peak = run(None, diffusers_tiling=True)
    rows["diffusers"] = {"psnr_to_untiled_db": float(psnr_y(out, reference)), "seconds": seconds, "peak_rss_mb": peak}
    print(f"  {'diffusers':12s} PSNR to untiled {rows['diffusers']['psnr_to_untiled_db']:6.2f} dB, {seconds:6.1f} s, "
          f"peak RSS {peak:.0f} MB", flush=True)
    return {"image": f"mosaic {size[0]}x{size[1]} (HR), x4 from {size[0] // 4}x{size[1] // 4}",
            "vae_max_side": max_side, "vae_tile": tile, "vae_pad": tiles.vae_pad,
            "pixels_over_budget": size[0] * size[1] / max_side**2, "rows": rows}


def large_upscale(model_spec: str | None, lr_size: tuple[int, int], workdir: Path) -> dict:
    """`python -m compress upscale` on a mosaic of lr_size in a fresh process: wall time and peak RSS."""
    from PIL import Image

    path = workdir / f"large-{lr_size[0]}x{lr_size[1]}.png"
    Image.fromarray(mosaic(*lr_size)).save(path)
    argv = ["upscale", str(path), "-o", str(workdir / "out")]
    if model_spec:
        argv += ["--model", model_spec]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _CLI_WITH_PEAK, *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"upscale of {path} failed: {result.stderr[-2000:]}")
    peak_kb = next(int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith(PEAK_MARK))
    with Image.open(workdir / "out" / path.with_suffix(".png").name) as image:
        size = image.size
    return {"input": list(lr_size), "output": list(size), "seconds": seconds, "peak_rss_mb": peak_kb / 1024,
            "megapixels_out": size[0] * size[1] / 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model spec as for `compress upscale` (default: built-in)")
    parser.add_argument("--size", type=_size, default=(2048, 1536), help="HR size of the accuracy test, WxH")
    parser.add_argument("--max-side", type=int, default=1024, help="--vae-max-side of the tiled runs")
    parser.add_argument("--tile", type=int, default=512, help="--vae-tile of the tiled runs")
    parser.add_argument("--large", type=_size, default=(1500, 1000), help="LR size of the scale test, WxH")
    parser.add_argument("--skip-large", action="store_true", help="only the accuracy part")
    parser.add_argument("--out", type=Path, default=None, help="folder for tiled-vae.json and tiled-vae.md")
    ns = parser.parse_args(argv)

    import tempfile

    from compress.quality.cost import machine_info

    print(f"accuracy: {ns.size[0]}x{ns.size[1]} output, VAE whole up to {ns.max_side} px", flush=True)
    result = {"accuracy": accuracy(ns.model, ns.size, ns.max_side, ns.tile)}
    if not ns.skip_large:
        with tempfile.TemporaryDirectory() as tmp:
            quarter = (ns.large[0] // 2, ns.large[1] // 2)
            result["scale"] = []
            for size in (quarter, ns.large):
                print(f"scale: upscale {size[0]}x{size[1]} -> {4 * size[0]}x{4 * size[1]} in a fresh process ...",
                      flush=True)
                row = large_upscale(ns.model, size, Path(tmp))
                result["scale"].append(row)
                print(f"  {row['seconds']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    result["machine"] = machine_info()
    lines = _report(result)
    print("\n".join(lines))
    if ns.out:
        from benchmarks import write_results

        write_results(ns.out, "tiled-vae", result, "\n".join(lines) + "\n")
    return 0


def _report(result: dict) -> list[str]:
    acc = result["accuracy"]
    lines = [
        f"# Tiled VAE ({acc['image']})", "",
        f"VAE whole up to {acc['vae_max_side']} px (the image has {acc['pixels_over_budget']:.1f}x that many pixels); "
        f"tiles of {acc['vae_tile']} px + {acc['vae_pad']} px context. PSNR-Y of the final output to the untiled one.",
        "", "| VAE statistics | PSNR to untiled (dB) | time (s) | peak RSS (MB) |", "| --- | --- | --- | --- |",
    ]
    for name, row in acc["rows"].items():
        value = "reference" if row["psnr_to_untiled_db"] is None else f"{row['psnr_to_untiled_db']:.2f}"
        peak = f"{row['peak_rss_mb']:.0f}" if row["peak_rss_mb"] is not None else "n/a"
        lines.append(f"| {name} | {value} | {row['seconds']:.1f} | {peak} |")
    if "scale" in result:
        lines += ["", "| upscale (fresh process) | output MP | time (s) | s per MP | peak RSS (MB) |",
                  "| --- | --- | --- | --- | --- |"]
        for row in result["scale"]:
            lines.append(f"| {row['input'][0]}x{row['input'][1]} -> {row['output'][0]}x{row['output'][1]} | "
                         f"{row['megapixels_out']:.1f} | {row['seconds']:.0f} | "
                         f"{row['seconds'] / row['megapixels_out']:.1f} | {row['peak_rss_mb']:.0f} |")
    info = result["machine"]
    lines += ["", f"Machine: {info.get('cpu_model', '')}, {info.get('cpu_cores_logical')} logical cores, torch "
              f"{info.get('packages', {}).get('torch', '')}, {info.get('date_utc', '')}."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
