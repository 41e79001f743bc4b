"""Put the carried pure-Python wheels on the path of a machine that cannot install anything.

The GPU machine has torch, accelerate, torchvision and friends but not diffusers, lpips or
webdataset, and nothing can be fetched there. `scripts/prepare_gpu_carry.sh` downloads their
wheels here (`.gpu_carry/wheels`); on that machine this script unpacks them (wheels are zip files;
lpips reads its weights from its package folder, so a zipped wheel on the path would not do) and
prints the folders to put on PYTHONPATH. Only what the machine lacks goes on the path: a carried
wheel is used when its distribution is missing there, or too old for a requirement of the GPU
check or of another carried wheel, so the machine's own installs are never shadowed needlessly.

    python scripts/gpu_carry.py --wheels .gpu_carry/wheels --unpack /tmp/carry --report carry.json

stdout: the folders joined by ':'; stderr: one line per decision; --report: the same as JSON.
Standard library only (plus `packaging` when the machine or the carry has it), because it runs
before anything else is importable.
"""

import argparse
import email.parser
import importlib.metadata
import json
import re
import sys
import zipfile
from pathlib import Path

# What the GPU check imports that a machine may lack, with the lowest versions vaekit is tested with.
ROOTS = ("diffusers>=0.42.1", "lpips>=0.1.4", "webdataset>=1.0.2", "braceexpand", "pytest>=8")


def canonical(name):
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def unpack(wheels, dest):
    """Extract every wheel under `wheels` into dest/<wheel name> (once: a marker file says it is whole)."""
    folders = []
    for wheel in sorted(Path(wheels).glob("*.whl")):
        folder = Path(dest) / wheel.name.removesuffix(".whl")
        marker = folder / ".unpacked"
        if not marker.exists():
            with zipfile.ZipFile(wheel) as z:
                z.extractall(folder)
            marker.write_text(wheel.name)
        folders.append(folder)
    return folders


def wheel_metadata(folder):
    """(name, version, [Requires-Dist lines]) of an unpacked wheel."""
    meta = next(folder.glob("*.dist-info/METADATA"))
    message = email.parser.Parser().parsestr(meta.read_text(encoding="utf-8"))
    return message["Name"], message["Version"], message.get_all("Requires-Dist") or []


def installed_version(name):
    """The version the machine itself has (the carry is not on sys.path yet), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirement_tools(folders):
    """packaging's Requirement and Version, from the machine or else from the carried wheel."""
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        carried = [f for f in folders if f.name.startswith("packaging-")]
        if not carried:
            return None, None
        sys.path.insert(0, str(carried[0]))
        from packaging.requirements import Requirement
        from packaging.version import Version
    return Requirement, Version


def select(folders, roots=ROOTS):
    """The carried folders the machine needs for `roots`, and a list of decisions (dicts) saying why."""
    Requirement, Version = requirement_tools(folders)
    carried = {}
    for folder in folders:
        name, version, requires = wheel_metadata(folder)
        carried[canonical(name)] = (folder, name, version, requires)
    chosen, decisions, seen = [], [], set()
    queue = [(r, "gpu check") for r in roots]
    while queue:
        text, wanted_by = queue.pop(0)
        if Requirement is None:  # no way to read version specifiers: fall back to "missing or not"
            name, spec = re.split(r"[ ;<>=!~\[(]", text, maxsplit=1)[0], None
        else:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name, spec = req.name, req.specifier
        key = canonical(name)
        if key in seen:
            continue
        have = installed_version(name)
        ok = have is not None and (not spec or spec.contains(Version(have), prereleases=True))
        if ok:
            seen.add(key)
            decisions.append({"name": name, "use": "machine", "version": have, "wanted": text, "by": wanted_by})
            continue
        if key not in carried:
            seen.add(key)
            decisions.append({"name": name, "use": "missing", "version": have, "wanted": text, "by": wanted_by})
            continue
        folder, real_name, version, requires = carried[key]
        seen.add(key)
        chosen.append(folder)
        decisions.append({"name": real_name, "use": "carried", "version": version, "machine": have,
                          "wanted": text, "by": wanted_by})
        queue += [(r, real_name) for r in requires]
    return chosen, decisions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", required=True, help="folder of carried .whl files (may be absent)")
    parser.add_argument("--unpack", required=True, help="folder to unpack them into")
    parser.add_argument("--report", help="write the decisions here as JSON")
    parser.add_argument("--root", action="append", default=None,
                        help="a requirement the check needs (repeatable; default: " + ", ".join(ROOTS) + ")")
    args = parser.parse_args(argv)
    Path(args.unpack).mkdir(parents=True, exist_ok=True)
    folders = unpack(args.wheels, args.unpack) if Path(args.wheels).is_dir() else []
    chosen, decisions = select(folders, args.root or ROOTS)
    for d in decisions:
        extra = f" (machine has {d['machine'] or 'none'})" if d["use"] == "carried" else ""
        print(f"carry: {d['name']} {d['version'] or ''}: {d['use']}{extra}; {d['wanted']} for {d['by']}",
              file=sys.stderr)
    if args.report:
        Path(args.report).write_text(json.dumps({"wheels": len(folders), "decisions": decisions}, indent=1))
    print(":".join(str(f) for f in chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
