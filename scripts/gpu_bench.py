"""The phases of the time-boxed GPU check (scripts/gpu_check.sh): each row is written the moment it is measured.

A GPU machine is lent for minutes, and a command on it may be cut short, so nothing here waits for
the end: `init` writes the whole plan (every row, pending) into OUTDIR/results.json and
results.md, each `run PHASE` updates its rows one by one (atomically: the JSON is valid after every
row), and `close PHASE` marks what a phase killed by its timeout or by the time budget left
undone (the running row as killed, rows not started as skipped). gpu_check.sh runs each phase as its
own process under `timeout`.

Speed rows reuse scripts/bench.py (variants, the plain diffusers training step, timing, FLOPs and
the PSNR gate: every speed row is checked against an fp32 reference on the same weights before its
ratio counts). Batch sizes are explicit lists; nothing searches.

    python scripts/gpu_bench.py init part1 OUT --device cuda     # the plan, every row pending
    python scripts/gpu_bench.py phases OUT                        # "NAME TIMEOUT_S" per phase
    python scripts/gpu_bench.py run OUT decode                    # one phase, row by row
    python scripts/gpu_bench.py close OUT decode --rc 124         # after it: what it left undone
    python scripts/gpu_bench.py report OUT                        # results.md again, to stdout

`init` reads the settings (sizes, batches, levers, budget) and stores them in results.json; the
other commands read them from there. `--device cpu` selects the rehearsal sizes (tiny model, tiny
images, seconds per phase) used by tests/test_gpu_check.py.
"""

import argparse
import contextlib
import datetime
import fnmatch
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib lives beside this script
from benchlib import cpu_name, error_text, fmt, is_oom  # noqa: E402
from vaekit.io import write_json, write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The phases of each part, in order, with their timeouts in seconds on CUDA (CPU: CPU_TIMEOUTS).
# The 60-second training run sits in part1 because part2's four cold compiles take most of its
# time; in each part the phase whose length is least certain (the training run, the compiles) comes
# last, so an overrun costs only its own rows. Estimated on an H200 from the row list: part1 about
# 250 s, part2 200-280 s (benchmarks/RESULTS.md, "How the GPU check runs").
PARTS = {
    "part1": (("env", 60), ("pytest", 120), ("decode", 150), ("train_step", 120), ("train_run", 200)),
    "part2": (("env", 60), ("bulk", 150), ("compiled", 300)),
}
CPU_TIMEOUTS = {"env": 240, "pytest": 400, "decode": 300, "train_step": 300, "train_run": 400, "compiled": 400,
                "bulk": 300}
EAGER_LEVERS = ("channels_last", "sdpa", "fused_upsample", "fused_groupnorm")
TARGETS = {"decode_vs_eager": 2.0, "encode_vs_eager": 1.5, "train_vs_plain": 1.5, "bulk_vs_encoder": 0.85}
# A lever "pays" when dropping it makes the row at least this much slower (and "costs" the other way).
LEVER_NOISE = 0.03


# ----------------------------------------------------------------------------------------------
# Settings and the plan


def parse_init(argv):
    """The options of `init`; every size has a CUDA default and a CPU-rehearsal default (see resolve)."""
    p = argparse.ArgumentParser(prog="gpu_bench.py init", description="Write the plan of one part.")
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("out", help="output folder: results.json, results.md")
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the rehearsal sizes)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--preset", default=None, help="architecture (default: sd on CUDA, tiny on CPU)")
    p.add_argument("--model", default=None, help="a vaekit model argument with real weights, instead of --preset")
    p.add_argument("--phases", default=None, help="comma list: only these phases of the part")
    p.add_argument("--budget_s", type=float, default=None,
                   help="time budget of the whole part; rows not started by then are skipped (default 300 CUDA)")
    p.add_argument("--phase_timeout", action="append", default=[], metavar="NAME=S", help="override a phase timeout")
    p.add_argument("--decode_size", type=int, default=None)
    p.add_argument("--decode_batches", default=None, help="comma list (default 1,4)")
    p.add_argument("--compile_decode_batch", type=int, default=None, help="decode batch of the compile phase (4)")
    p.add_argument("--encode_size", type=int, default=None)
    p.add_argument("--encode_batch", type=int, default=None)
    p.add_argument("--train_size", type=int, default=None)
    p.add_argument("--train_batch", type=int, default=None)
    p.add_argument("--eager_levers", default=",".join(EAGER_LEVERS), help="vaekit's eager row; one row drops each")
    p.add_argument("--train_levers", default="channels_last,sdpa,fused_upsample", help="vaekit's training step")
    p.add_argument("--compile_levers", default="channels_last,sdpa,fused_upsample,compile",
                   help="vaekit's compiled row")
    p.add_argument("--compile_backend", default=None, help="torch.compile backend (inductor; eager on CPU)")
    p.add_argument("--compile_mode", default="default")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--gate_db", type=float, default=45.0)
    p.add_argument("--gate_images", type=int, default=None)
    p.add_argument("--lpips_net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--bulk_images", type=int, default=None)
    p.add_argument("--bulk_size", type=int, default=None)
    p.add_argument("--bulk_batch", type=int, default=None)
    p.add_argument("--bulk_workers", type=int, default=None)
    p.add_argument("--train_config", default="configs/train/kl_f8c4_256.yaml")
    p.add_argument("--train_images", type=int, default=None)
    p.add_argument("--train_seconds", type=float, default=None, help="SIGTERM the training run after this (60)")
    p.add_argument("--resume_steps", type=int, default=None)
    p.add_argument("--train_override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra vaekit train overrides (after the check's own)")
    p.add_argument("--matmul_size", type=int, default=None)
    p.add_argument("--import_timeout_s", type=float, default=None)
    p.add_argument("--pytest_args", default="-m gpu tests", help="what the pytest phase runs")
    p.add_argument("--peak_tflops", default=None,
                   help="measured,datasheet bf16 peak for the %% columns (default 790,989 on CUDA: H200)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--scratch", default=None, help="working folder (images, caches, runs); not returned")
    p.add_argument("--carry", default=str(ROOT / ".gpu_carry"), help="the carried wheels and LPIPS weights")
    p.add_argument("--rehearse_fault", action="append", default=[], metavar="ROW_GLOB=hang|error",
                   help="rehearsal: make matching rows hang or fail, to test timeouts and error rows")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def resolve(args):
    """Settings with the device's defaults filled in, as stored in results.json."""
    cuda = args.device.startswith("cuda")

    def pick(value, on_cuda, on_cpu):
        return value if value is not None else (on_cuda if cuda else on_cpu)

    timeouts = {name: (limit if cuda else CPU_TIMEOUTS[name]) for name, limit in PARTS[args.part]}
    for item in args.phase_timeout:
        name, _, value = item.partition("=")
        if name not in timeouts:
            raise SystemExit(f"--phase_timeout {item}: {args.part} has no phase {name!r}")
        timeouts[name] = float(value)
    phases = [name for name, _ in PARTS[args.part]]
    if args.phases:
        wanted = [p.strip() for p in args.phases.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in phases]
        if unknown:
            raise SystemExit(f"--phases: {args.part} has no phase {unknown[0]!r} (it has {', '.join(phases)})")
        phases = [p for p in phases if p in wanted]
    peak = args.peak_tflops or ("790,989" if cuda else None)
    overrides = ["disc.start=10" if cuda else "disc.start=1", "ema.enabled=true", "train.steps=1000000",
                 "train.checkpoint_every=1000000", "validation.every=0", "validation.num_images=4",
                 "validation.final_images=16", "log.progress=false", "log.every=10" if cuda else "log.every=1",
                 "data.num_workers=8" if cuda else "data.num_workers=1", "data.holdout=8" if cuda else "data.holdout=2"]
    if not cuda:  # the recipe itself (sd, 256 px, batch 12 x 2) would take hours on a CPU
        overrides += ["model.source=preset:tiny", "data.size=32", "train.batch_size=2"]
    return {
        "part": args.part, "device": args.device, "dtype": args.dtype,
        "preset": args.preset or ("sd" if cuda else "tiny"), "model": args.model,
        "phases": phases, "timeouts": timeouts, "budget_s": pick(args.budget_s, 300.0, 1200.0),
        "decode_size": pick(args.decode_size, 1024, 64),
        "decode_batches": [int(b) for b in (args.decode_batches or ("1,4" if cuda else "1,2")).split(",")],
        "compile_decode_batch": pick(args.compile_decode_batch, 4, 2),
        "encode_size": pick(args.encode_size, 256, 32), "encode_batch": pick(args.encode_batch, 64, 4),
        "train_size": pick(args.train_size, 256, 32), "train_batch": pick(args.train_batch, 16, 2),
        "eager_levers": lever_list(args.eager_levers), "train_levers": lever_list(args.train_levers),
        "compile_levers": lever_list(args.compile_levers),
        "compile_backend": pick(args.compile_backend, "inductor", "eager"), "compile_mode": args.compile_mode,
        "warmup": pick(args.warmup, 2, 2), "repeats": pick(args.repeats, 5, 2), "gate_db": args.gate_db,
        "gate_images": pick(args.gate_images, 4, 2), "lpips_net": args.lpips_net,
        "bulk_images": pick(args.bulk_images, 8192, 24), "bulk_size": pick(args.bulk_size, 256, 32),
        "bulk_batch": pick(args.bulk_batch, 64, 8), "bulk_workers": pick(args.bulk_workers, 16, 2),
        "train_config": args.train_config, "train_images": pick(args.train_images, 512, 16),
        "train_seconds": pick(args.train_seconds, 60.0, 10.0), "resume_steps": pick(args.resume_steps, 10, 2),
        "train_overrides": overrides + list(args.train_override),
        "matmul_size": pick(args.matmul_size, 8192, 256), "import_timeout_s": pick(args.import_timeout_s, 20.0, 120.0),
        "pytest_args": args.pytest_args,
        "peak_tflops": dict(zip(("measured", "datasheet"), (float(v) for v in peak.split(",")))) if peak else None,
        "threads": args.threads, "scratch": str(Path(args.scratch or Path(args.out) / "scratch").resolve()),
        "carry": str(Path(args.carry).resolve()), "faults": list(args.rehearse_fault), "seed": args.seed,
    }


def lever_list(text):
    """'a,b' -> ['a', 'b']."""
    return [name.strip() for name in text.split(",") if name.strip() and name.strip() != "none"]


def plan_rows(s):
    """Every row of the selected phases, in order; each names its baseline and the targets it answers."""
    rows = []

    def add(phase, workload, variant, family, batch=None, **extra):
        row = {"id": f"{phase}: {workload} | {variant}" + (f" | batch {batch}" if batch else ""), "phase": phase,
               "workload": workload, "variant": variant, "family": family, "batch": batch, "status": "pending"}
        row.update(extra)
        rows.append(row)
        return row["id"]

    for phase in s["phases"]:
        if phase == "env":
            for name in ("environment", "imports", "lpips weights", "bf16 matmul"):
                add("env", name, "check", "check")
        elif phase == "pytest":
            add("pytest", "gpu tests", s["pytest_args"], "check")
        elif phase == "decode":
            size, levers = s["decode_size"], s["eager_levers"]
            for b in s["decode_batches"]:
                w = f"decode {size}px"
                eager = add("decode", w, "diffusers eager", "eager", b, kind="decode", size=size)
                full = add("decode", w, f"vaekit eager [{','.join(levers)}]", "vaekit", b, kind="decode", size=size,
                           levers=levers, baseline=eager,
                           targets=[{"name": f"decode {size}px batch {b}, vaekit eager levers vs diffusers eager",
                                     "against": eager, "min": TARGETS["decode_vs_eager"]}])
                for lever in levers:
                    add("decode", w, f"vaekit eager without {lever}", "ablation", b, kind="decode", size=size,
                        levers=[x for x in levers if x != lever], baseline=eager, ablation_of=full, without=lever)
        elif phase == "train_step":
            size, b, w = s["train_size"], s["train_batch"], f"train step {s['train_size']}px"
            plain = add("train_step", w, "diffusers plain step", "eager", b, kind="train", size=size)
            add("train_step", w, f"vaekit step [{','.join(s['train_levers'])}]", "vaekit", b, kind="train", size=size,
                levers=s["train_levers"], baseline=plain,
                targets=[{"name": f"train step {size}px batch {b} vs the plain diffusers step", "against": plain,
                          "min": TARGETS["train_vs_plain"]}])
            add("train_step", w, "vaekit step, no levers", "ablation", b, kind="train", size=size, levers=["sdpa"],
                baseline=plain)
        elif phase == "train_run":
            w = f"vaekit train {Path(s['train_config']).stem}"
            add("train_run", w, f"{s['train_seconds']:g} s, then SIGTERM: checkpoint", "check")
            add("train_run", w, f"resume, +{s['resume_steps']} steps, export", "check")
            add("train_run", w, "export loads in diffusers", "check")
        elif phase == "compiled":
            for kind, size, b in (("decode", s["decode_size"], s["compile_decode_batch"]),
                                  ("encode", s["encode_size"], s["encode_batch"])):
                w = f"{kind} {size}px"
                eager = add("compiled", w, "diffusers eager", "eager", b, kind=kind, size=size)
                base = add("compiled", w, "diffusers channels_last+compile", "compiled", b, kind=kind, size=size,
                           baseline=eager)
                minimum = TARGETS["decode_vs_eager" if kind == "decode" else "encode_vs_eager"]
                targets = [{"name": f"{w} batch {b}, vaekit compiled vs diffusers eager", "against": eager,
                            "min": minimum}]
                if kind == "decode":
                    targets.append({"name": f"{w} batch {b}, vaekit compiled vs diffusers channels_last+compile",
                                    "against": base, "min": 1.0, "strict": True})
                add("compiled", w, f"vaekit [{','.join(s['compile_levers'])}]", "vaekit", b, kind=kind, size=size,
                    levers=s["compile_levers"], baseline=eager, targets=targets)
        elif phase == "bulk":
            w, b = f"bulk encode {s['bulk_size']}px", s["bulk_batch"]
            alone = add("bulk", w, "encoder alone (device batches)", "eager", b, kind="bulk")
            add("bulk", w, f"vaekit encode end to end ({s['bulk_workers']} workers)", "vaekit", b, kind="bulk",
                baseline=alone, targets=[{"name": f"{w}: end to end vs the encoder alone", "against": alone,
                                          "min": TARGETS["bulk_vs_encoder"]}])
    return rows


# ----------------------------------------------------------------------------------------------
# results.json and results.md


class Results:
    """The output folder's results.json (the truth) and results.md (rendered from it), rewritten after each change."""

    def __init__(self, out):
        self.out = Path(out)
        self.doc = json.loads((self.out / "results.json").read_text())

    @property
    def settings(self):
        return self.doc["settings"]

    def rows(self, phase=None):
        return [r for r in self.doc["rows"] if phase is None or r["phase"] == phase]

    def phase(self, name):
        return next(p for p in self.doc["phases"] if p["name"] == name)

    def update(self, row, **fields):
        row.update(fields)
        self.save()

    def save(self):
        save(self.out, self.doc)


def save(out, doc):
    """Derive ratios, targets and lever verdicts, then write both files atomically."""
    derive(doc)
    doc["updated"] = now_text()
    write_json(Path(out) / "results.json", finite(doc))
    write_text(Path(out) / "results.md", render(doc))


def finite(value):
    """The document with non-finite floats as null: strict JSON, readable by any parser."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def now_text():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def measured(row):
    return row is not None and row.get("status") == "ok" and row.get("ms_per_image")


def derive(doc):
    """Fill each row's TFLOP/s, % of peak and ratio, and the document's targets and lever verdicts."""
    by_id = {r["id"]: r for r in doc["rows"]}
    peak = doc["settings"].get("peak_tflops") or {}
    for r in doc["rows"]:
        if not measured(r):
            continue
        if r.get("flops") and r.get("seconds"):
            r["tflops"] = r["flops"] / r["seconds"] / 1e12
            for which, value in peak.items():
                r[f"pct_of_{which}_peak"] = 100 * r["tflops"] / value
        base = by_id.get(r.get("baseline"))
        if measured(base):
            r["ratio"] = base["ms_per_image"] / r["ms_per_image"]
    targets = []
    for r in doc["rows"]:
        for t in r.get("targets", []):
            against = by_id.get(t["against"])
            entry = {"target": t["name"], "min": t["min"], "strict": bool(t.get("strict")), "row": r["id"],
                     "against": t["against"], "ratio": None}
            if measured(r) and measured(against):
                entry["ratio"] = against["ms_per_image"] / r["ms_per_image"]
                gates = [g for g in (r.get("gate_ok"), against.get("gate_ok")) if g is not None]
                if not all(gates):
                    entry["met"], entry["note"] = None, "not claimed: a row failed the PSNR gate"
                else:
                    ok = entry["ratio"] > t["min"] if t.get("strict") else entry["ratio"] >= t["min"]
                    entry["met"], entry["note"] = ok, "met" if ok else "MISSED"
            else:
                entry["met"] = None
                entry["note"] = f"not measured ({r['status']} / {against['status'] if against else 'absent'})"
            targets.append(entry)
    doc["targets"] = targets
    levers = {}
    for r in doc["rows"]:
        if not r.get("without"):
            continue
        full = by_id.get(r.get("ablation_of"))
        entry = levers.setdefault(r["without"], {"lever": r["without"], "default_on": LEVER_DEFAULTS.get(r["without"]),
                                                 "speedups": {}, "unmeasured": []})
        label = f"{r['workload']} batch {r['batch']}"
        if measured(r) and measured(full) and r.get("gate_ok") is not False and full.get("gate_ok") is not False:
            entry["speedups"][label] = r["ms_per_image"] / full["ms_per_image"]  # > 1: the lever makes it faster
        else:
            entry["unmeasured"].append(label)
    for entry in levers.values():
        entry["verdict"] = lever_verdict(entry)
    levers = list(levers.values())
    doc["levers"] = levers


# Whether optimize_vae / FastConfig switch a lever on when it is not named (vaekit.codec.levers).
LEVER_DEFAULTS = {"channels_last": True, "sdpa": True, "fuse_qkv": False, "fused_upsample": False,
                  "fused_groupnorm": False, "compile": False, "cuda_graphs": False}


def lever_verdict(entry):
    """Whether a lever pays at every measured batch, and what its default should then be."""
    gains = entry["speedups"]
    if not gains:
        return "not measured"
    pays = all(g >= 1 + LEVER_NOISE for g in gains.values())
    costs = [k for k, g in gains.items() if g <= 1 - LEVER_NOISE]
    if pays:
        return "pays at every batch" + ("" if entry["default_on"] else ": a candidate to switch on by default")
    what = f"costs at {', '.join(costs)}" if costs else f"does not pay (within {LEVER_NOISE:.0%}) everywhere"
    if entry["default_on"]:
        return f"{what}: switch it off by default ({lever_switch(entry['lever'])})"
    return f"{what}: it stays off by default ({lever_switch(entry['lever'])})"


def lever_switch(lever):
    """Where a lever is switched off."""
    switch = f"optimize_vae({lever}=False) / FastConfig.{lever}"
    if lever == "channels_last":
        switch += "; vaekit encode --no-channels-last"
    return switch


def render(doc):
    """results.md: status, environment, every row (pending ones too), targets, levers, phases."""
    s, rows = doc["settings"], doc["rows"]
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    env = doc.get("environment") or {}
    lines = [f"# GPU check {s['part']}: {env.get('device_name', s['device'])}", "",
             f"Started {doc['created']}, updated {doc.get('updated', '')}; time budget {s['budget_s']:g} s. Rows: "
             + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ".", ""]
    if doc.get("fatal"):
        lines += [f"**Stopped early: {doc['fatal']}**", ""]
    if env:
        lines += ["## Environment", ""] + [f"- {k}: `{v}`" for k, v in env.items() if v not in (None, "")] + [""]
    peak = s.get("peak_tflops") or {}
    head = ["phase", "workload", "variant", "batch", "status", "ms/image", "images/s", "vs baseline", "TFLOP/s",
            *[f"% of {v:g}" for v in peak.values()], "PSNR dB (gate)", "first call s", "peak MiB", "note"]
    lines += ["## Rows", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("gate_ok") is False:
            vs, gate = "not claimed", f"{r['psnr_db']:.1f} FAIL"
        else:
            vs = fmt(r.get("ratio"), ".2f") + "x" if r.get("ratio") is not None else "–"
            gate = f"{r['psnr_db']:.1f} ok" if r.get("psnr_db") is not None else "–"
        note = r.get("error") or r.get("note") or ""
        cells = [r["phase"], r["workload"], r["variant"], str(r["batch"] or ""), r["status"],
                 fmt(r.get("ms_per_image"), ".3f"), fmt(r.get("images_per_s"), ".1f"), vs, fmt(r.get("tflops"), ".1f"),
                 *[fmt(r.get(f"pct_of_{k}_peak"), ".1f") for k in peak], gate, fmt(r.get("first_call_s"), ".2f"),
                 fmt(r.get("peak_mib"), ".0f"), note.replace("|", "/").replace("\n", " ")[:200]]
        lines.append("| " + " | ".join(cells) + " |")
    if doc.get("targets"):
        lines += ["", "## Targets", ""]
        for t in doc["targets"]:
            ratio = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "–"
            lines.append(f"- {t['target']}: {ratio} (target {'>' if t['strict'] else '>='} {t['min']:g}x): {t['note']}")
    if doc.get("levers"):
        lines += ["", "## Levers (each dropped from vaekit's eager set)", ""]
        lines.append("Speed-up of vaekit's eager row over the same row without the lever (> 1: the lever pays).")
        lines.append("")
        for v in doc["levers"]:
            gains = ", ".join(f"{k}: {g:.3f}x" for k, g in v["speedups"].items()) or "–"
            lines.append(f"- {v['lever']} (default {'on' if v['default_on'] else 'off'}): {gains}. {v['verdict']}")
    lines += ["", "## Phases", "", "| phase | status | seconds | limit s | note |", "|---|---|---:|---:|---|"]
    for p in doc["phases"]:
        lines.append(f"| {p['name']} | {p['status']} | {fmt(p.get('seconds'), '.1f')} | {fmt(p.get('limit_s'), '.0f')} "
                     f"| {p.get('note', '')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Commands without torch: init, phases, deadline, close, report


def cmd_init(argv):
    args = parse_init(argv)
    settings = resolve(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(settings["scratch"]).mkdir(parents=True, exist_ok=True)
    start = time.time()
    doc = {"tool": "scripts/gpu_check.sh", "created": now_text(), "started_at": start,
           "deadline": start + settings["budget_s"], "command": " ".join(shlex.quote(a) for a in sys.argv),
           "settings": settings, "environment": {},
           "phases": [{"name": n, "status": "pending", "timeout_s": settings["timeouts"][n]} for n in settings["phases"]],
           "rows": plan_rows(settings)}
    save(out, doc)
    return 0


def cmd_phases(argv):
    results = Results(argv[0])
    for p in results.doc["phases"]:
        print(p["name"], int(p["timeout_s"]))
    return 0


def cmd_deadline(argv):
    print(int(Results(argv[0]).doc["deadline"]))
    return 0


def cmd_close(argv):
    """Mark what a finished or killed phase left: running -> killed, pending -> skipped; exit 3 after a fatal env."""
    p = argparse.ArgumentParser(prog="gpu_bench.py close")
    p.add_argument("out")
    p.add_argument("phase")
    p.add_argument("--rc", type=int, default=None, help="the phase's exit code (124/137: killed by timeout)")
    p.add_argument("--limit", type=float, default=None, help="the timeout it ran under")
    p.add_argument("--skip", default=None, help="the phase was not started, for this reason")
    args = p.parse_args(argv)
    results = Results(args.out)
    phase = results.phase(args.phase)
    now = time.time()
    if args.skip:
        phase.update(status="skipped", note=args.skip)
        reason_pending, reason_running = f"phase not started: {args.skip}", None
    else:
        phase["limit_s"] = args.limit
        if phase.get("started_at"):
            phase["seconds"] = now - phase["started_at"]
        if args.rc in (124, 137):
            budget = args.limit is not None and args.limit < phase["timeout_s"]
            why = "the time budget ran out" if budget else f"its {args.limit:g} s timeout"
            phase.update(status="timed out", note=f"killed after {args.limit:g} s: {why}")
            reason_pending = f"not started: the phase was killed ({why})"
            reason_running = f"killed by the phase timeout ({why})"
        elif args.rc == 0 or args.rc == 3:
            phase["status"] = "done" if args.rc == 0 else "fatal"
            reason_pending = reason_running = "phase ended before this row"
        else:
            phase.update(status="failed", note=f"exit code {args.rc}")
            reason_pending = f"not started: the phase exited with code {args.rc}"
            reason_running = f"the phase process died (exit code {args.rc}) during this row"
    for row in results.rows(args.phase):
        if row["status"] == "running":
            row.update(status="killed", note=reason_running,
                       wall_s=now - row["started_at"] if row.get("started_at") else None)
        elif row["status"] == "pending":
            row.update(status="skipped", note=reason_pending)
    if args.rc == 3:
        results.doc.setdefault("fatal", "the environment check failed")
        phase.setdefault("note", results.doc["fatal"])
    results.save()
    return 3 if args.rc == 3 else 0


def cmd_report(argv):
    results = Results(argv[0])
    results.save()
    print((Path(argv[0]) / "results.md").read_text())
    return 0


# ----------------------------------------------------------------------------------------------
# `run PHASE`: the measuring side (torch is imported here only)


class RowFailure(Exception):
    """A row that ran but failed a check: the message, and the fields it did measure."""

    def __init__(self, message, **fields):
        super().__init__(message)
        self.fields = fields


class Context:
    """What every runner needs: settings, device, dtype, scripts/bench.py and its argument namespace."""

    def __init__(self, results):
        import torch  # the measuring commands only; init/phases/close stay torch-free and fast

        from vaekit.device import DTYPES

        self.results, self.s, self.torch, self._bench = results, results.settings, torch, None
        s = self.s
        self.device, self.dtype = torch.device(s["device"]), DTYPES[s["dtype"]]
        self.cuda = self.device.type == "cuda"
        if s["threads"]:
            torch.set_num_threads(s["threads"])
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # for every row alike, baselines included
        self.scratch = Path(s["scratch"])
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.args = argparse.Namespace(
            seed=s["seed"], model=s["model"], preset=s["preset"], gate_images=s["gate_images"], gate_db=s["gate_db"],
            warmup=s["warmup"], repeats=s["repeats"], lpips_net=s["lpips_net"], baseline_compile_mode=s["compile_mode"],
            compile_backend=s["compile_backend"])
        self._base = None

    @property
    def bench(self):
        """scripts/bench.py (variants, timing, the gate, the plain training step); it needs diffusers."""
        if self._bench is None:
            sys.path.insert(0, str(Path(__file__).parent))
            import bench  # a script beside this one, not a package: loaded on first use, after the import check
            import diffusers

            diffusers.utils.logging.set_verbosity_error()  # its dtype-cast notice would repeat for every row
            self._bench = bench
        return self._bench

    @property
    def base(self):
        """The fp32 model every speed row copies its weights from."""
        if self._base is None:
            self._base = self.bench.load_base(self.args)
        return self._base

    def levers(self, names):
        from vaekit.codec import levers

        config = levers.parse_levers(",".join(names) or "none")
        config.compile_mode, config.compile_backend = self.s["compile_mode"], self.s["compile_backend"]
        return config

    def variant(self, row):
        """bench.Variant of a speed row."""
        levers = self.levers(row["levers"]) if row.get("levers") is not None else None
        return self.bench.Variant(row["variant"], row["family"], levers)

    def free(self):
        import gc

        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()


def memo(cache, key, make):
    """cache[key], made once; a failure is remembered and raised again (the next rows fail fast)."""
    if key not in cache:
        try:
            cache[key] = ("ok", make())
        except Exception as e:  # noqa: BLE001 - stored and re-raised for every row that needs it
            cache[key] = ("error", e)
    status, value = cache[key]
    if status == "error":
        raise value
    return value


def bench_fields(row):
    """The measured fields of a bench.Row."""
    return {"seconds": row.seconds, "first_call_s": row.first_call_s, "peak_mib": row.peak_mib,
            "psnr_db": row.psnr_db, "gate_ok": row.gate_ok, "flops": row.flops, "ms_per_image": row.ms_per_image,
            "images_per_s": row.images_per_s}


class EnvRunner:
    """Environment, the import check, the LPIPS weights (seeded from the carry), a bf16 matmul."""

    CORE = ("torch", "diffusers", "vaekit.codec.levers", "vaekit.train.loop", "vaekit.cache.encode")

    def __init__(self, ctx):
        self.ctx, self.fatal = ctx, None

    def measure(self, row):
        return getattr(self, row["workload"].replace(" ", "_"))()

    def environment(self):
        torch, ctx = self.ctx.torch, self.ctx
        info = {"date": now_text(), "host": platform.node(), "python": platform.python_version(),
                "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                "triton": version_of("triton"), "diffusers": version_of("diffusers"),
                "accelerate": version_of("accelerate"), "lpips": version_of("lpips"),
                "cpu_count": os.cpu_count(), "load_average": " ".join(f"{v:.2f}" for v in os.getloadavg())}
        if ctx.cuda:
            if not torch.cuda.is_available():
                self.fatal = "torch sees no CUDA device"
                raise RowFailure("torch.cuda.is_available() is False: no GPU to check")
            props = torch.cuda.get_device_properties(ctx.device)
            info.update(device_name=torch.cuda.get_device_name(ctx.device), capability=f"{props.major}.{props.minor}",
                        sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                        nvidia_smi=command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                                   "clocks.max.sm,power.limit", "--format=csv,noheader"]))
            print(command_output(["nvidia-smi"]), flush=True)
        else:
            info["device_name"] = cpu_name()
        info["git_commit"] = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        carry = ctx.scratch.parent / "carry.json"
        if carry.is_file():
            decisions = json.loads(carry.read_text())["decisions"]
            info["carried"] = ", ".join(f"{d['name']} {d['version']}" for d in decisions if d["use"] == "carried")
            missing = [d["name"] for d in decisions if d["use"] == "missing"]
            info["not_on_machine_nor_carried"] = ", ".join(missing) or None
        self.ctx.results.doc["environment"] = info
        return {"note": f"{info['device_name']}; torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}, "
                        f"diffusers {info['diffusers']}, python {info['python']}", "details": info}

    def imports(self):
        limit = self.ctx.s["import_timeout_s"]
        start = time.perf_counter()
        lines, timed_out = [], False
        proc = subprocess.Popen([sys.executable, "-c", IMPORT_CHECK], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            out, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            timed_out = True
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(line))
        failed = {r["module"]: r["error"] for r in lines if r.get("error")}
        missing = sorted({r["missing"] for r in lines if r.get("missing")})
        details = {"modules": len(lines), "failed": failed, "missing": missing, "seconds": time.perf_counter() - start}
        if timed_out:
            last = lines[-1]["module"] if lines else "the first"
            details["timed_out_after"] = f"{limit:g} s (after {last})"
        core_bad = [m for m in self.CORE if m in failed or (timed_out and m not in {r["module"] for r in lines})]
        if core_bad:
            self.fatal = f"import check: {', '.join(core_bad)} cannot be imported ({failed.get(core_bad[0], 'timed out')})"
        if failed or timed_out:
            what = f"missing: {', '.join(missing)}; " if missing else ""
            raise RowFailure(f"{what}{len(failed)} of {len(lines)} modules failed"
                             + (f"; timed out after {limit:g} s" if timed_out else "")
                             + ": " + "; ".join(f"{m}: {e}" for m, e in list(failed.items())[:4]), details=details)
        return {"note": f"{len(lines)} modules import in {details['seconds']:.1f} s", "details": details}

    def lpips_weights(self):
        details = seed_lpips_cache(self.ctx.s)
        notes = [f"{net}: " + ("MISSING" if text == "missing" else "seeded from the float16 carry" if "seeded" in text
                               else "ok") for net, text in details.items()]
        if details[self.ctx.s["lpips_net"]] == "missing":
            raise RowFailure(f"no LPIPS-{self.ctx.s['lpips_net']} weights (carry: {self.ctx.s['carry']}/lpips); "
                             "the training rows fall back to a random backbone", details=details)
        return {"note": "; ".join(notes), "details": details}

    def bf16_matmul(self):
        torch, device, n = self.ctx.torch, self.ctx.device, self.ctx.s["matmul_size"]
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device, torch.bfloat16)
        b = torch.randn(n, n, generator=g).to(device, torch.bfloat16)
        calls = 20 if self.ctx.cuda else 3
        times = []
        for i in range(3 + calls):
            if self.ctx.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            a @ b
            if self.ctx.cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        first, seconds = times[0], sorted(times[3:])[calls // 2]
        return {"seconds": seconds, "first_call_s": first, "flops": 2.0 * n**3, "ms_per_image": 1000 * seconds,
                "images_per_s": 1 / seconds, "note": f"{n}x{n} @ {n}x{n}, median of {calls} (one 'image' = one matmul)"}

    def close(self):
        return 3 if self.fatal else 0


def seed_lpips_cache(s):
    """Fill $VAEKIT_CACHE with the LPIPS backbones from the carry's float16 copies where missing; {net: where}."""
    from vaekit.pretrained import backbones, fetch

    details = {}
    for net in ("vgg", "alex"):
        file = Path(s["carry"]) / "lpips" / fetch.cached_path(f"lpips-{net}").name
        seeded = ""
        if not backbones.lpips_available(net) and file.is_file():
            fetch.fetch_weights(f"lpips-{net}", origin=str(file), log=lambda text: print(text, flush=True))
            seeded = f"seeded from the float16 carry {file}; "
        source = backbones.find_lpips_backbone(net)
        details[net] = f"{seeded}{source}" if source else "missing"
    return details


# The import check: each module in turn, one JSON line each, so a hang still says how far it got.
IMPORT_CHECK = r"""
import importlib, json, pkgutil, sys, time
third = ["torch", "torchvision", "triton", "accelerate", "safetensors", "diffusers", "lpips", "webdataset",
         "braceexpand", "torchmetrics", "skimage", "tensorboard", "yaml", "tqdm", "PIL", "numpy", "pytest"]
def check(name):
    t = time.perf_counter()
    entry = {"module": name}
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        entry.update(error=f"ModuleNotFoundError: {e}", missing=e.name)
    except Exception as e:
        entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    entry["seconds"] = round(time.perf_counter() - t, 3)
    print(json.dumps(entry), flush=True)
for name in third:
    check(name)
import vaekit
for info in pkgutil.walk_packages(vaekit.__path__, "vaekit.", onerror=lambda name: None):
    if not info.name.endswith("__main__"):  # those run the command line
        check(info.name)
"""


def version_of(name):
    import importlib.metadata

    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(name)
    return None


def command_output(cmd):
    """stdout of a short command, or None when it is absent or fails."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


class PytestRunner:
    """`pytest -m gpu`: the GPU-only tests (Triton kernel, levers on CUDA, bf16/fp16 training and resume)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def measure(self, row):
        xml = self.ctx.scratch / "pytest.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={xml}",
               *shlex.split(self.ctx.s["pytest_args"])]
        start = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT).returncode  # output into the phase log
        seconds = time.perf_counter() - start
        summary = junit_summary(xml) if xml.is_file() else {}
        details = {"returncode": rc, "seconds": seconds, **summary}
        note = (f"{summary.get('passed', 0)} passed, {summary.get('failed', 0)} failed, "
                f"{summary.get('skipped', 0)} skipped in {seconds:.0f} s")
        if rc not in (0, 5) or summary.get("failed"):  # 5: no test collected
            raise RowFailure(note + ("; " + "; ".join(summary.get("failures", [])[:3]) if summary.get("failures") else
                                     f"; pytest exit code {rc}"), details=details)
        return {"note": note, "details": details}

    def close(self):
        return 0


def junit_summary(path):
    """Passed / failed / skipped counts and the failing tests of a pytest junit XML file."""
    import xml.etree.ElementTree as ET

    failures, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            counts["failed"] += 1
            message = (bad.get("message") or "").splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {message[0][:160] if message else ''}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


class InferenceRunner:
    """Decode / encode rows: eager levers with leave-one-out (decode), or compiled models made once (compiled).

    A model is built per row in the eager phase; in the compiled phase each model (diffusers eager,
    diffusers channels_last+compile, vaekit with compile) is built and compiled once, and serves its
    decode row and its encode row, so each compiles its decoder once and its encoder once.
    """

    def __init__(self, ctx, reuse_models):
        self.ctx, self.reuse, self.setups, self.models = ctx, reuse_models, {}, {}
        if reuse_models:
            import torch._dynamo  # one compile per model: start from an empty dynamo cache

            torch._dynamo.reset()

    def measure(self, row):
        ctx, bench = self.ctx, self.ctx.bench
        workload = bench.Workload(row["kind"], row["size"], row["batch"])
        setup = memo(self.setups, (workload.kind, workload.size, workload.batch),
                     lambda: bench.prepare_inference(workload, ctx.base, ctx.args, ctx.device, ctx.dtype))
        variant = ctx.variant(row)
        if self.reuse:
            vae = memo(self.models, row["family"],
                       lambda: bench.prepare_vae(ctx.base, variant, ctx.args, ctx.device, ctx.dtype))
            return bench_fields(bench.measure_inference(setup, vae, variant, ctx.args, ctx.device))
        vae = bench.prepare_vae(ctx.base, variant, ctx.args, ctx.device, ctx.dtype)
        try:
            return bench_fields(bench.measure_inference(setup, vae, variant, ctx.args, ctx.device))
        finally:
            vae = None
            ctx.free()

    def close(self):
        return 0


class TrainStepRunner:
    """One training step at 256 px: the plain diffusers step, vaekit's step, vaekit's step without levers."""

    def __init__(self, ctx):
        self.ctx, self.setups = ctx, {}
        with contextlib.suppress(Exception):  # the env phase does this; a phase run on its own needs it too
            seed_lpips_cache(ctx.s)

    def measure(self, row):
        ctx, bench = self.ctx, self.ctx.bench
        workload = bench.Workload("train", row["size"], row["batch"])
        setup = memo(self.setups, "train",
                     lambda: bench.prepare_train(workload, ctx.base, ctx.args, ctx.device, ctx.dtype))
        fields = bench_fields(bench.measure_train(setup, ctx.variant(row), ctx.args, ctx.device, ctx.dtype))
        fields["note"] = f"LPIPS-{ctx.s['lpips_net']} {setup.perceptual_source}"
        return fields

    def close(self):
        return 0


class BulkRunner:
    """`vaekit encode` end to end on synthetic JPEGs against the encoder alone on device batches, same settings."""

    def __init__(self, ctx):
        self.ctx, self.cache = ctx, {}

    def config(self, **extra):
        from vaekit.cache.config import EncodeConfig

        s = self.ctx.s
        return EncodeConfig(data=str(self.images()), out=str(self.ctx.scratch / "latents"), vae=model_spec(s),
                            resolution=s["bulk_size"], batch_size=s["bulk_batch"], num_workers=s["bulk_workers"],
                            dtype="fp16", **extra)

    def images(self):
        s = self.ctx.s
        return memo(self.cache, "images", lambda: write_jpegs(self.ctx.scratch / "jpegs", s["bulk_images"],
                                                              s["bulk_size"], s["bulk_workers"]))

    def gate_pixels(self):
        """(keys, uint8 pixels (N, 3, H, W)) of the first gate images, prepared exactly as the pipeline does."""
        def make():
            from vaekit.cache.encode import open_data
            from vaekit.cache.format import size_policy
            from vaekit.cache.units import Preparer
            from vaekit.model import downsample_factor

            config = self.config()
            plan = open_data(config)
            prepare = Preparer(size_policy(config, downsample_factor(self.vae())), config.background)
            chosen = [prepare(*plan.read(i)) for i in range(min(self.ctx.s["gate_images"], len(plan.source)))]
            return [c["key"] for c in chosen], self.ctx.torch.stack([c["pixels"] for c in chosen])
        return memo(self.cache, "gate", make)

    def vae(self):
        """A fresh copy of the VAE `vaekit encode` loads (seeded presets: the same weights as the pipeline's)."""
        import copy

        from vaekit.cache.encode import load_encoder_vae

        return copy.deepcopy(memo(self.cache, "vae", lambda: load_encoder_vae(self.config())))

    def reference(self):
        """fp32 posterior means of the gate images (TF32 off), on the same weights."""
        def make():
            torch, bench = self.ctx.torch, self.ctx.bench
            _, pixels = self.gate_pixels()
            vae = self.vae().to(self.ctx.device, torch.float32).eval()
            x = pixels.to(self.ctx.device).float() / 127.5 - 1.0  # as BulkEncoder converts uint8
            with torch.no_grad(), bench.strict_fp32():
                mean = vae.encode(x).latent_dist.mean
            flops = bench.count_flops(lambda: vae.encode(x[:1]).latent_dist.mean)
            return mean, flops
        return memo(self.cache, "reference", make)

    def measure(self, row):
        return self.encoder_alone() if row["family"] == "eager" else self.end_to_end()

    def encoder_alone(self):
        bench, ctx = self.ctx.bench, self.ctx
        from vaekit.codec.inference import BulkEncoder
        from vaekit.device import resolve_compute_dtype

        s = ctx.s
        config = self.config()
        reference, flops = self.reference()
        encoder = BulkEncoder(self.vae(), ctx.device, resolve_compute_dtype(config.compute_dtype, ctx.device),
                              config.channels_last, config.compile)
        keys, gate = self.gate_pixels()
        repeat = -(-s["bulk_batch"] // len(gate))
        pixels = gate.repeat(repeat, 1, 1, 1)[:s["bulk_batch"]].to(ctx.device)  # (B, 3, H, W) real images

        def step():
            mean, logvar = encoder(pixels)
            return mean.half(), logvar.half()  # the storage cast the pipeline does too

        batches = max(1, s["bulk_images"] // s["bulk_batch"])
        first = time.perf_counter()
        for _ in range(3):
            step()
        bench.sync(ctx.device)
        first = (time.perf_counter() - first) / 3
        start = time.perf_counter()
        for _ in range(batches):
            mean, _ = step()
        bench.sync(ctx.device)
        seconds = (time.perf_counter() - start) / batches
        psnr = bench.psnr_against(mean[:len(gate)].float(), reference)
        return {"seconds": seconds, "first_call_s": first, "flops": flops * s["bulk_batch"],
                "ms_per_image": 1000 * seconds / s["bulk_batch"], "images_per_s": s["bulk_batch"] / seconds,
                "psnr_db": psnr, "gate_ok": psnr >= s["gate_db"],
                "note": f"{batches} batches of {s['bulk_batch']}, uint8 on the device, compute {encoder.dtype}"}

    def end_to_end(self):
        bench, ctx = self.ctx.bench, self.ctx
        from vaekit.cache.dataset import load_latents
        from vaekit.cache.encode import encode_dataset

        s = ctx.s
        reference, flops = self.reference()
        config = self.config()
        vae = self.vae()  # built before the clock starts: weights load outside the measured time
        shutil.rmtree(config.out, ignore_errors=True)  # a fresh cache: every image is encoded
        start = time.perf_counter()
        summary = encode_dataset(config, vae=vae, progress=False)
        seconds = time.perf_counter() - start
        keys, _ = self.gate_pixels()
        stored = ctx.torch.stack([load_latents(config.out, key)[0] for key in keys]).to(reference.device)
        psnr = bench.psnr_against(stored, reference)
        encoded = summary["encoded"]
        fields = {"seconds": seconds * s["bulk_batch"] / max(encoded, 1), "flops": flops * s["bulk_batch"],
                  "ms_per_image": 1000 * seconds / max(encoded, 1), "images_per_s": encoded / seconds,
                  "psnr_db": psnr, "gate_ok": psnr >= s["gate_db"], "details": summary,
                  "note": f"{encoded} images in {seconds:.1f} s wall (start to summary), {s['bulk_workers']} decode "
                          f"workers, fp16 storage; gate on the stored means"}
        if encoded != s["bulk_images"]:
            raise RowFailure(f"encoded {encoded} of {s['bulk_images']} images ({summary['errors']} errors)", **fields)
        return fields

    def close(self):
        return 0


def model_spec(s):
    return s["model"] or f"preset:{s['preset']}"


def write_jpegs(folder, count, size, workers):
    """`count` synthetic size x size JPEGs (smooth gradients, shapes and grain: photo-like sizes), in parallel."""
    import multiprocessing

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:06d}.jpg", i, size) for i in range(count) if not (folder / f"{i:06d}.jpg").exists()]
    if jobs:
        with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
            pool.starmap(write_jpeg, jobs, chunksize=64)
    return folder


def write_jpeg(path, seed, size):
    """One synthetic photo-like JPEG (quality 90), deterministic in `seed`."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([rng.uniform(0, 255) + rng.uniform(-120, 120) * (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))
                     for _ in range(3)], axis=-1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, size, 2)
        x1, y1 = x0 + rng.integers(4, size // 2), y0 + rng.integers(4, size // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([int(x0), int(y0), int(x1), int(y1)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    tmp = path.with_suffix(".tmp")
    img.save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)


class TrainRunRunner:
    """`vaekit train` of the recipe: run, SIGTERM after N s (checkpoint), resume for a few steps, export, load."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.run_dir = ctx.scratch / "train_run"
        self.state = {}
        with contextlib.suppress(Exception):  # the env phase does this; a phase run on its own needs it too
            seed_lpips_cache(ctx.s)

    def command(self, options=(), overrides=()):
        s = self.ctx.s
        data = write_jpegs(self.ctx.scratch / "train_images", s["train_images"], s["train_size"],
                           max(1, os.cpu_count() or 1))
        return [sys.executable, "-m", "vaekit", "train", "--config", str(ROOT / s["train_config"]), *options,
                f"out_dir={self.run_dir}", f"data.path={data}", *s["train_overrides"], *overrides]

    def measure(self, row):
        family = row["variant"]
        if "SIGTERM" in family:
            return self.first_run()
        if family.startswith("resume"):
            return self.resume()
        return self.load_export()

    def first_run(self):
        s = self.ctx.s
        log_path = self.ctx.scratch / "train_first.log"
        start = time.time()
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(self.command(), cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
            try:
                stopped_at = self.stop_after(proc, start, s["train_seconds"], log_path)
                rc = proc.wait(timeout=180)
            finally:
                if proc.poll() is None:
                    proc.kill()
        echo_tail(log_path)
        from vaekit.train.checkpoint import list_checkpoints

        found = list_checkpoints(self.run_dir)
        if rc not in (0, 128 + signal.SIGTERM) or not found:  # 143: stopped by the SIGTERM, checkpoint saved
            raise RowFailure(f"vaekit train exited with {rc} after SIGTERM; checkpoints: {len(found)}; "
                             f"{tail_text(log_path)}")
        meta = json.loads((found[-1] / "meta.json").read_text())
        steps = train_log_steps(self.run_dir / "train.log")
        self.state.update(step=meta["step"], checkpoint=found[-1])
        last = steps[-1][1] if steps else {}
        rate = last.get("images_per_s")
        fields = {"note": f"step {meta['step']} at SIGTERM ({stopped_at:.0f} s), checkpoint {found[-1].name} "
                          f"interrupted={meta['interrupted']}, {meta['loop']['disc_updates']} discriminator updates, "
                          f"EMA {'on' if meta.get('ema') else 'off'}",
                  "details": {"step": meta["step"], "interrupted": meta["interrupted"], "loop": meta["loop"],
                              "last_log": last, "wall_s": time.time() - start},
                  "ms_per_image": 1000 / rate if rate else None, "images_per_s": rate}
        problems = [p for p, bad in (("not marked interrupted", not meta["interrupted"]),
                                     ("no discriminator update", meta["loop"]["disc_updates"] < 1),
                                     ("no EMA", not meta.get("ema"))) if bad]
        if problems:
            raise RowFailure("checkpoint: " + ", ".join(problems), **fields)
        return fields

    def stop_after(self, proc, start, seconds, log_path):
        """SIGTERM once `seconds` have passed and a step was logged; returns when it was sent (s after start)."""
        grace = 180 if self.ctx.cuda else 300
        while True:
            rc = proc.poll()
            if rc is not None:
                raise RowFailure(f"vaekit train exited with {rc} before it was stopped: {tail_text(log_path)}")
            elapsed = time.time() - start
            if elapsed >= seconds and train_log_steps(self.run_dir / "train.log"):
                proc.send_signal(signal.SIGTERM)
                return elapsed
            if elapsed >= seconds + grace:
                raise RowFailure(f"no training step logged after {elapsed:.0f} s: {tail_text(log_path)}")
            time.sleep(0.5)

    def resume(self):
        if "step" not in self.state:
            raise RowFailure("no checkpoint from the first run to resume")
        target = self.state["step"] + self.ctx.s["resume_steps"]
        log_path = self.ctx.scratch / "train_resume.log"
        start = time.time()
        with open(log_path, "w") as log_file:
            rc = subprocess.run(self.command(["--resume", "latest"], [f"train.steps={target}"]), cwd=ROOT,
                                stdout=log_file, stderr=subprocess.STDOUT).returncode
        echo_tail(log_path)
        seconds = time.time() - start
        text = (self.run_dir / "train.log").read_text() if (self.run_dir / "train.log").is_file() else ""
        resumed = f"at step {self.state['step']}" in text and "Resumed from" in text
        export = self.run_dir / "vae"
        metrics = json.loads((self.run_dir / "metrics.json").read_text()) if (self.run_dir / "metrics.json").is_file() else {}
        details = {"returncode": rc, "seconds": seconds, "resumed": resumed, "target_step": target, "metrics": metrics}
        if rc != 0 or not resumed or not (export / "config.json").is_file():
            raise RowFailure(f"resume: exit code {rc}, resumed from step {self.state['step']}: {resumed}, export "
                             f"{'present' if (export / 'config.json').is_file() else 'missing'}; {tail_text(log_path)}",
                             details=details)
        self.state["final_step"] = target
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        return {"note": f"resumed at step {self.state['step']}, finished step {target} in {seconds:.0f} s; held-out "
                        f"{shown}", "details": details}

    def load_export(self):
        torch = self.ctx.torch
        from diffusers import AutoencoderKL
        from safetensors.torch import load_file

        from vaekit.train.checkpoint import checkpoint_path

        if "final_step" not in self.state:
            raise RowFailure("no export from the resumed run")
        vae = AutoencoderKL.from_pretrained(self.run_dir / "vae")
        ema = load_file(str(checkpoint_path(self.run_dir, self.state["final_step"]) / "ema.safetensors"))
        exported = vae.state_dict()
        common = [k for k in ema if k in exported]
        diff = max((exported[k].float() - ema[k].float()).abs().max().item() for k in common)
        vae = vae.to(self.ctx.device, self.ctx.dtype).eval()
        side = self.ctx.s["train_size"] // 8
        with torch.no_grad():
            image = vae.decode(torch.randn(1, vae.config.latent_channels, side, side, device=self.ctx.device,
                                           dtype=self.ctx.dtype)).sample
        finite_out = bool(torch.isfinite(image).all())
        details = {"tensors_compared": len(common), "max_abs_diff_vs_checkpoint_ema": diff, "decode_finite": finite_out}
        if diff != 0 or not finite_out or len(common) < len(exported) // 2:
            raise RowFailure(f"export: max |export - checkpoint EMA| {diff:g} over {len(common)} tensors, decode "
                             f"finite {finite_out}", details=details)
        return {"note": f"AutoencoderKL.from_pretrained: {len(common)} tensors equal to the checkpoint's EMA; "
                        f"decodes on {self.ctx.device} in {self.ctx.s['dtype']}", "details": details}

    def close(self):
        return 0


def train_log_steps(path):
    """[(step, {key: value})] of the trainer's step lines in train.log."""
    if not Path(path).is_file():
        return []
    steps = []
    for line in Path(path).read_text().splitlines():
        match = re.search(r" step (\d+)  (.*)$", line)
        if match and "validation" not in match.group(2):
            values = {}
            for key, value in re.findall(r"(\w+) (\S+)", match.group(2)):
                with contextlib.suppress(ValueError):
                    values[key] = float(value)
            steps.append((int(match.group(1)), values))
    return steps


def tail_text(path, lines=3):
    """The last lines of a log, on one line (for an error message)."""
    with contextlib.suppress(OSError):
        return " / ".join(Path(path).read_text().strip().splitlines()[-lines:])[-400:]
    return ""


def echo_tail(path, lines=15):
    """The end of a subprocess log into the phase log."""
    with contextlib.suppress(OSError):
        print("\n".join(Path(path).read_text().splitlines()[-lines:]), flush=True)


RUNNERS = {
    "env": EnvRunner,
    "pytest": PytestRunner,
    "decode": lambda ctx: InferenceRunner(ctx, reuse_models=False),
    "compiled": lambda ctx: InferenceRunner(ctx, reuse_models=True),
    "train_step": TrainStepRunner,
    "train_run": TrainRunRunner,
    "bulk": BulkRunner,
}


def rehearsed_fault(row, faults):
    """'hang' or 'error' when a --rehearse_fault pattern matches the row id, else None."""
    for item in faults:
        pattern, _, what = item.rpartition("=")
        if fnmatch.fnmatchcase(row["id"], pattern):
            return what
    return None


def cmd_run(argv):
    """Run one phase: each pending row in turn, written before (running) and after (its result)."""
    results = Results(argv[0])
    name = argv[1]
    phase = results.phase(name)
    phase.update(status="running", started_at=time.time())
    results.save()
    s = results.settings
    try:
        ctx = Context(results)
        runner = RUNNERS[name](ctx)
    except Exception as e:  # noqa: BLE001 - say so in every row of the phase rather than only in the log
        traceback.print_exc()
        for row in results.rows(name):
            if row["status"] == "pending":
                row.update(status="error", error=f"phase setup failed: {error_text(e)}")
        if name == "env":
            results.doc["fatal"] = f"the environment phase could not start: {error_text(e)}"
        results.save()
        return 3 if name == "env" else 1
    for row in results.rows(name):
        if row["status"] != "pending":
            continue
        if time.time() > results.doc["deadline"]:
            results.update(row, status="skipped", note="the time budget was spent before this row started")
            continue
        print(f"--- {row['id']}", flush=True)
        results.update(row, status="running", started_at=time.time())
        start = time.perf_counter()
        fields = {}
        try:
            fault = rehearsed_fault(row, s["faults"])
            if fault == "hang":
                time.sleep(10**6)  # a hung kernel or compile: the phase timeout must end it
            elif fault == "error":
                raise RuntimeError("rehearsed fault in this row")
            fields = runner.measure(row)
            status = "ok"
        except RowFailure as e:
            fields, status = dict(e.fields, error=str(e)), "error"
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            traceback.print_exc()
            fields = {"error": error_text(e)}
            status = "oom" if is_oom(e) else "error"
            with contextlib.suppress(Exception):
                ctx.free()
        fields["wall_s"] = time.perf_counter() - start
        results.update(row, status=status, **fields)
        print(f"    {status}: {fields.get('note') or fields.get('error') or ''}"
              + (f" {fields['ms_per_image']:.3f} ms/image" if fields.get("ms_per_image") else ""), flush=True)
    rc = runner.close()
    if getattr(runner, "fatal", None):
        results.doc["fatal"] = runner.fatal
        results.save()
    return rc


COMMANDS = {"init": cmd_init, "phases": cmd_phases, "deadline": cmd_deadline, "run": cmd_run, "close": cmd_close,
            "report": cmd_report}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
