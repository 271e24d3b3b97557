"""Markdown comparison of re-run records (runs/g) against the replaced ones (a superseded folder)."""
import json, pathlib, sys
old_dir = pathlib.Path(sys.argv[1]); new_dir = pathlib.Path("runs/g/records")
print("| cell | old: CPU, code | ACC old -> new | ASR old -> new | same | wall s old -> new | CPU s old -> new |")
print("|---|---|---|---|---|---|---|")
n = same = 0; wo = wn = 0.0
for o in sorted(old_dir.glob("*.json")):
    a = json.loads((new_dir / o.name).read_text()); b = json.loads(o.read_text())
    s = a["acc"] == b["acc"] and a["asr"] == b["asr"]; n += 1; same += s; wo += b["seconds"]; wn += a["seconds"]
    cpu = (b.get("cpu") or "not recorded").replace("Intel(R) Xeon(R) Processor", "Intel Xeon")
    oc = f"{b['cpu_seconds']:.1f}" if b.get("cpu_seconds") else "–"
    print(f"| {o.name[24:-16]} | {cpu}, {b.get('code_version')} | {b['acc']:.2f} -> {a['acc']:.2f} | {b['asr']:.2f} -> {a['asr']:.2f} | "
          f"{'yes' if s else '**no**'} | {b['seconds']:.1f} -> {a['seconds']:.1f} | {oc} -> {a['cpu_seconds']:.1f} |")
print(f"\n{n} cells, {same} with the same ACC and ASR; mean wall-clock seconds {wo / n:.1f} -> {wn / n:.1f}.")
