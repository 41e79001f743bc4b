"""The time-boxed GPU check (scripts/gpu_check.sh), rehearsed on CPU: rows land one by one, a phase killed by
its timeout keeps what it measured, the time budget skips what did not start, and the carried wheels go on
the path only where the machine lacks them."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "gpu_check.sh"
CARRY = ROOT / "scripts" / "gpu_carry.py"


def strict_json(path):
    """results.json parsed as strict JSON (NaN / Infinity refused)."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)


def check_env(tmp_path):
    """The environment of a rehearsal: this interpreter, a private scratch folder, no CUDA."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SCRATCH=str(tmp_path / "work"), CUDA_VISIBLE_DEVICES="")
    env.pop("VAEKIT_CACHE", None)
    return env


def rows_by_variant(doc):
    return {(r["variant"], r["batch"]): r for r in doc["rows"]}


@pytest.mark.slow  # both GPU-check phases rehearsed end to end, 30 s on 2 cores: `make test-slow`
def test_rows_land_one_by_one_and_a_killed_phase_keeps_them(tmp_path):
    out = tmp_path / "out"
    # Row 2 fails, row 4 hangs (a stuck kernel or compile) until the 25 s phase timeout kills the phase;
    # then the next phase runs, its rows failing on purpose (quickly: nothing is measured).
    cmd = ["bash", str(CHECK), "part1", str(out), "--device", "cpu", "--phases", "decode,train_step",
           "--decode_batches", "1", "--phase_timeout", "decode=25", "--repeats", "1", "--warmup", "1",
           "--rehearse_fault", "decode: * | vaekit eager [[]*=error",
           "--rehearse_fault", "decode: * | vaekit eager without sdpa | *=hang",
           "--rehearse_fault", "train_step: *=error"]
    proc = subprocess.Popen(cmd, env=check_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    seen, hung = [], False
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (out / "results.json").is_file():
            doc = strict_json(out / "results.json")  # atomic writes: valid whenever it is read
            done = [r["id"] for r in doc["rows"] if r["status"] not in ("pending", "running")]
            if not seen or done != seen[-1]:
                seen.append(done)
            hang = next(r for r in doc["rows"] if "without sdpa" in r["variant"])
            if hang["status"] == "running":
                hung = True
                # While the phase hangs, the rows before it are already in both files.
                assert [r["status"] for r in doc["rows"][:3]] == ["ok", "error", "ok"]
                assert "vaekit eager without channels_last" in (out / "results.md").read_text()
        time.sleep(0.2)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1, output  # a phase did not finish
    assert hung, output
    # Rows appeared one at a time, each observation extending the previous one.
    assert len(seen) >= 3 and all(a == b[:len(a)] for a, b in zip(seen, seen[1:]))

    doc = strict_json(out / "results.json")
    rows = rows_by_variant(doc)
    eager = rows[("diffusers eager", 1)]
    assert eager["status"] == "ok" and eager["gate_ok"] and eager["ms_per_image"] > 0 and eager["flops"] > 0
    assert rows[("vaekit eager [channels_last,sdpa,fused_upsample,fused_groupnorm]", 1)]["error"] == \
        "RuntimeError: rehearsed fault in this row"
    after = rows[("vaekit eager without channels_last", 1)]  # the row after the error still ran
    assert after["status"] == "ok" and after["psnr_db"] >= 45 and after["ratio"] > 0
    killed = rows[("vaekit eager without sdpa", 1)]
    assert killed["status"] == "killed" and "timeout" in killed["note"]
    for lever in ("fused_upsample", "fused_groupnorm"):
        skipped = rows[(f"vaekit eager without {lever}", 1)]
        assert skipped["status"] == "skipped" and "killed" in skipped["note"]
    phases = {p["name"]: p for p in doc["phases"]}
    assert phases["decode"]["status"] == "timed out" and phases["decode"]["limit_s"] == 25
    assert phases["train_step"]["status"] == "done"  # the phase after the killed one ran
    assert all(r["status"] == "error" for r in doc["rows"] if r["phase"] == "train_step")
    report = (out / "results.md").read_text()
    assert "| decode | decode 64px | vaekit eager without sdpa | 1 | killed |" in report
    assert "| decode | timed out |" in report
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "results.json", "results.md"]


def test_spent_budget_skips_every_row_and_still_writes_both_files(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(CHECK), "part2", str(out), "--device", "cpu", "--budget_s", "0"],
                          env=check_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    doc = strict_json(out / "results.json")
    assert [p["name"] for p in doc["phases"]] == ["env", "bulk", "compiled"]
    assert {p["status"] for p in doc["phases"]} == {"skipped"}
    assert len(doc["rows"]) == 4 + 2 + 6
    assert all(r["status"] == "skipped" and "budget" in r["note"] for r in doc["rows"])
    assert "Rows: 12 skipped." in (out / "results.md").read_text()
    assert "Rows: 12 skipped." in done.stdout  # the report is also printed, for a tool that keeps only output


def write_wheel(folder, name, version, requires=()):
    """A minimal pure-Python wheel: one module and its dist-info."""
    module = name.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *[f"Requires-Dist: {r}" for r in requires]]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", f"VERSION = {version!r}\n")
        z.writestr(f"{module}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
        z.writestr(f"{module}-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n")
    return path


def test_carried_wheels_fill_only_what_the_machine_lacks(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "vaekit-carry-a", "1.0", ["vaekit-carry-b>=2", "packaging", 'vaekit-carry-c; python_version < "3"'])
    write_wheel(wheels, "vaekit-carry-b", "2.1")
    write_wheel(wheels, "vaekit-carry-c", "1.0")  # only for Python 2: never needed
    write_wheel(wheels, "packaging", "0.1")  # the machine's own packaging satisfies the requirement
    report = tmp_path / "carry.json"
    done = subprocess.run([sys.executable, str(CARRY), "--wheels", str(wheels), "--unpack", str(tmp_path / "unpacked"),
                           "--report", str(report), "--root", "vaekit-carry-a", "--root", "vaekit-carry-missing"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    folders = done.stdout.strip().split(":")
    assert [Path(f).name for f in folders] == ["vaekit_carry_a-1.0-py3-none-any", "vaekit_carry_b-2.1-py3-none-any"]
    decisions = {d["name"]: d for d in json.loads(report.read_text())["decisions"]}
    assert decisions["vaekit-carry-a"]["use"] == "carried" and decisions["vaekit-carry-b"]["use"] == "carried"
    assert decisions["packaging"]["use"] == "machine"
    assert decisions["vaekit-carry-missing"]["use"] == "missing"
    assert "vaekit-carry-c" not in decisions
    imported = subprocess.run([sys.executable, "-c", "import vaekit_carry_a, vaekit_carry_b; print(vaekit_carry_b.VERSION)"],
                              env=dict(os.environ, PYTHONPATH=done.stdout.strip()), capture_output=True, text=True)
    assert imported.stdout.strip() == "2.1", imported.stderr


@pytest.mark.slow
@pytest.mark.parametrize("part", ["part1", "part2"])
def test_full_rehearsal_on_cpu(tmp_path, part):
    # Every phase of the part at the rehearsal sizes: the environment and import check, pytest -m gpu (all
    # skipped here), the speed rows with their gates, the training run with SIGTERM, resume and export,
    # the compiled rows (torch.compile's eager backend on CPU) and the bulk encode.
    out = tmp_path / "out"
    carried = (ROOT / ".gpu_carry" / "lpips").is_dir()
    # Without the carry the check's private weight cache has no LPIPS backbone: the training rows then
    # rehearse without the perceptual term (the env row still has to say the weights are missing).
    extra = [] if carried else ["--train_override", "loss.perceptual_weight=0"]
    done = subprocess.run(["bash", str(CHECK), part, str(out), "--device", "cpu", *extra], env=check_env(tmp_path),
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    doc = strict_json(out / "results.json")
    bad = [(r["id"], r["status"], r.get("error")) for r in doc["rows"] if r["status"] != "ok"]
    if not carried:  # a checkout without `bash scripts/prepare_gpu_carry.sh`
        expected = [b for b in bad if b[0] == "env: lpips weights | check" and "no LPIPS-vgg weights" in b[2]]
        assert expected, "the check must say that the carried LPIPS weights are missing"
        bad = [b for b in bad if b not in expected]
    assert done.returncode == 0 and not bad, (bad, done.stdout[-3000:])
    for r in doc["rows"]:
        if r.get("psnr_db") is not None:
            assert r["gate_ok"] and r["psnr_db"] >= 45, r
        if r["family"] != "check":
            assert r["ms_per_image"] > 0 and r["images_per_s"] > 0, r
    assert doc["environment"]["torch"] and doc["environment"]["device_name"]
    assert doc["targets"] and all(t["ratio"] is not None for t in doc["targets"])
    if part == "part1":
        assert len(doc["levers"]) == 4 and all(v["speedups"] for v in doc["levers"])
        export = next(r for r in doc["rows"] if r["variant"] == "export loads in diffusers")
        assert export["details"]["max_abs_diff_vs_checkpoint_ema"] == 0
