#!/usr/bin/env bash
# The GPU path in one script: builds the GPU environment (`make venv-gpu`, in .venv-gpu so the
# CPU .venv stays as it is), checks that each GPU path is really taken (onnxruntime's CUDA
# provider for faces, pycolmap built with CUDA for PatchMatch, EGL on the NVIDIA driver rather than
# Mesa llvmpipe), then runs the demo job twice - CPU only (CUDA_VISIBLE_DEVICES empty) and with the
# GPU - and prints the stage timings side by side with their ratio, and peak memory.
# Budget: under 6 minutes on a GPU node with the wheels reachable.
#
# Where no NVIDIA GPU is present it says so and stops (exit 0, nothing measured): the
# development machines have none, so these numbers exist only where someone ran this on one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi missing or lists none): nothing measured, stopping."
  exit 0
fi
nvidia-smi -L
t0=$(date +%s)

bash scripts/ensure_debs.sh time          # /usr/bin/time: wall time and peak RSS of each run
make sysdeps venv                        # the CPU environment: the baseline, and the GPU one's start
if [ ! -x .venv-gpu/bin/python ]; then
  cp -a .venv .venv-gpu                  # same packages; make venv-gpu swaps the CUDA builds in
fi
make VENV=.venv-gpu venv-gpu
echo "environments ready after $(( $(date +%s) - t0 )) s"

# Each GPU path, asked directly: a GPU run that silently fell back to the CPU measures nothing.
.venv-gpu/bin/python - <<'PY'
import sys
import moderngl, onnxruntime, pycolmap
problems = []
providers = onnxruntime.get_available_providers()
print("onnxruntime providers:", providers)
if "CUDAExecutionProvider" not in providers:
    problems.append("onnxruntime has no CUDA provider")
print("pycolmap CUDA:", pycolmap.has_cuda)
if not pycolmap.has_cuda:
    problems.append("pycolmap was built without CUDA (no PatchMatch)")
ctx = moderngl.create_standalone_context(backend="egl")
renderer = ctx.info.get("GL_RENDERER", "?")
print("EGL renderer:", renderer)
if "llvmpipe" in renderer.lower() or "nvidia" not in renderer.lower():
    problems.append(f"EGL renders on {renderer}, not the NVIDIA GPU")
if problems:
    sys.exit("GPU paths missing: " + "; ".join(problems))
PY

out=out/bench-gpu
rm -rf "$out"
run() {  # run NAME PYTHON [ENV...]: the demo job, its wall time and peak RSS (the driver and Ray's workers)
  local name=$1 py=$2; shift 2
  echo "== demo, $name"
  env "$@" /usr/bin/time -f "%e %M" -o "$out/$name.time" "$py" -m cli.main demo --out "$out/$name" >"$out/$name.log" 2>&1 \
    || { tail -20 "$out/$name.log"; exit 1; }
}
mkdir -p "$out"
run cpu .venv/bin/python CUDA_VISIBLE_DEVICES= SITEPLAN_DATA_DIR="$out/cpu-data"
run gpu .venv-gpu/bin/python SITEPLAN_DATA_DIR="$out/gpu-data"

.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
t = {s: json.loads((out / s / "report.json").read_text())["timings_s"] for s in ("cpu", "gpu")}
print(f"{'stage':<14}{'CPU s':>9}{'GPU s':>9}{'CPU/GPU':>9}")
for stage in sorted(set(t["cpu"]) | set(t["gpu"])):
    c, g = t["cpu"].get(stage), t["gpu"].get(stage)
    ratio = f"{c / g:.2f}" if c and g else "-"
    print(f"{stage:<14}{c if c is not None else '-':>9}{g if g is not None else '-':>9}{ratio:>9}")
for s in ("cpu", "gpu"):
    wall, rss_kb = (out / f"{s}.time").read_text().split()[-2:]
    print(f"{s}: wall {wall} s, peak RSS of the largest process {int(rss_kb) / 1024:.0f} MB")
PY
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
echo "bench/gpu.sh done in $(( $(date +%s) - t0 )) s"
