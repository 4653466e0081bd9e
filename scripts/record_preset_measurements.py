"""Copy the presets' measured speed and quality from benchmark output into the package.

Reads ``benchmarks/e2e.json`` (``scripts/bench_e2e.py``: Wan 2.1 1.3B at 480p on a GPU, time per step of
each preset and of dense cuDNN attention) and, when present, ``benchmarks/quality.json``
(``scripts/quality_report.py``: PSNR / SSIM of each preset's video against the dense video of the same
seed, on the default model), and writes ``dit_sparse/presets_measured.json``, which
:mod:`dit_sparse.presets` loads into each preset's ``measured`` field (``dit-sparse presets``, the
``generate`` summary). So the numbers users see are the benchmark's, never typed in by hand.

    python scripts/record_preset_measurements.py [--e2e benchmarks/e2e.json] [--quality benchmarks/quality.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_sparse._atomic import atomic_write_text  # noqa: E402


def speed_entries(e2e: dict) -> dict:
    wan = e2e["wan"]
    dense = wan["dense"]["time_per_step_s"]
    setting = (f"{e2e['gpu'].replace('NVIDIA ', '')}, Wan 2.1 1.3B 480p 81 frames, {wan['steps']} steps, "
               f"{e2e['date'][:10]}")
    return {
        name: {"speedup": round(dense / run["time_per_step_s"], 3), "setting": setting,
               "s_per_step": round(run["time_per_step_s"], 4), "dense_s_per_step": round(dense, 4)}
        for name, run in wan["presets"].items()
    }


def quality_entries(quality: dict) -> dict:
    out = {}
    for row in quality.get("presets", []):
        name = row.get("preset")
        if name and name != "dense" and isinstance(row.get("psnr_db"), (int, float)):
            out[name] = {"psnr_db": round(row["psnr_db"], 2), "ssim": round(row["ssim"], 4),
                         "quality_setting": quality.get("setting", "default model")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--e2e", type=pathlib.Path, default=ROOT / "benchmarks" / "e2e.json")
    p.add_argument("--quality", type=pathlib.Path, default=ROOT / "benchmarks" / "quality.json")
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "dit_sparse" / "presets_measured.json")
    args = p.parse_args(argv)
    if not args.e2e.is_file():
        print(f"{args.e2e} not found: run scripts/bench_e2e.py on a GPU first", file=sys.stderr)
        return 2
    measured = speed_entries(json.loads(args.e2e.read_text()))
    if args.quality.is_file():
        for name, q in quality_entries(json.loads(args.quality.read_text())).items():
            measured.setdefault(name, {}).update(q)
    atomic_write_text(args.out, json.dumps(measured, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}: {', '.join(sorted(measured))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
