#!/usr/bin/env bash
# One command for a CUDA machine: install, run the gpu-marked tests, time bf16 training of every preset (tokens/s and
# MFU, benchmarks/train_speed.py), run the rest of the tests (not those marked slow) and, in the time left, train and
# score every preset (benchmarks/quality.py). Every stage runs under `timeout`, all under one deadline (--budget,
# default 600 s); the JSON reports go to one folder (--out, default gpu-check-<UTC date>/), summary.json over all.
#
#   benchmarks/gpu_check.sh                               # on a GPU: the whole check, 10 minutes at most
#   benchmarks/gpu_check.sh --device cpu --smoke          # tiny sizes on the CPU, no install (tests/test_gpu_check.py)
#
# Options: --device cuda|cpu (default cuda), --smoke (tiny sizes, 2 presets, no install), --out DIR, --budget SECONDS,
# --skip-install, --quality-tokens N (training tokens per preset in the quality stage, default 2000000).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the scripts import this checkout's longctx, whatever is installed

device=cuda smoke=0 out="" budget=600 install=1 quality_tokens=2000000
while (($#)); do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --smoke) smoke=1; install=0; shift ;;
    --out) out=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    --skip-install) install=0; shift ;;
    --quality-tokens) quality_tokens=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
out=${out:-gpu-check-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$out/train_speed" "$out/quality" || exit 2
deadline=$(( $(date +%s) + budget ))
: >"$out/stages.tsv"
failed=0

# stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout` (at most LIMIT_S and what is left before the
# deadline), its output in OUT/NAME.log; one line NAME, status, exit code, milliseconds in OUT/stages.tsv. Status:
# ok, failed, timeout (its own limit: a failure) or deadline (cut by the global deadline: not a failure)
stage() {
  local name=$1 limit=$2 left rc t0 status clipped=0
  shift 2
  left=$(( deadline - $(date +%s) ))
  if (( left < 5 )); then
    printf '%s\tskipped\t\t0\n' "$name" >>"$out/stages.tsv"; echo "== $name: skipped (deadline)"; return 0
  fi
  (( limit > left )) && { limit=$left; clipped=1; }
  echo "== $name (at most ${limit} s)"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" >"$out/${name//\//_}.log" 2>&1
  rc=$?
  status=ok
  if (( rc == 124 || rc == 137 )); then
    status=timeout; ((clipped)) && status=deadline
  elif (( rc )); then
    status=failed
  fi
  [[ $status == timeout || $status == failed ]] && failed=1
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$out/stages.tsv"
  echo "   $status (exit $rc), log: $out/${name//\//_}.log"
}

# 1. install: keep a CUDA torch that is already there (the pinned CPU setup would replace it)
if ((install)); then
  if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    deps=$(python -c 'import shlex, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(shlex.join(d for d in p["dependencies"] + p["optional-dependencies"]["dev"] if not d.startswith("torch")))')
    stage install 300 bash -c "python -m pip install -q $deps && python -m pip install -q --no-deps -e ."
  else
    stage install 300 python -m pip install -q "torch==2.13.0" -e ".[dev]"
  fi
fi
if [[ $device == cuda* ]] && ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: --device $device but torch sees no CUDA device" >&2; exit 2
fi

# 2. the gpu-marked tests (they run where CUDA is available, and are skipped elsewhere). The smoke run only collects
# them: the suite itself runs the smoke run (tests/test_gpu_check.py).
if ((smoke)); then
  stage tests-gpu 120 python -m pytest -q -m gpu --junitxml="$out/tests-gpu.xml" \
    tests/layers tests/decoders/test_devices.py
else
  stage tests-gpu 180 python -m pytest -q -m gpu --junitxml="$out/tests-gpu.xml"
fi

# 3. training speed in bf16, every preset: tokens/s and MFU against the device's measured matmul peak
if ((smoke)); then
  presets="transformer-small perceiver-ar-small" train_args=(--smoke --threads 1) train_limit=120
  quality_presets="transformer-small" quality_args=(--smoke --threads 1)
else
  presets=$(python -c "from longctx.config import list_presets; print(' '.join(list_presets()))")
  train_args=(--batch-size 64 --steps 20 --warmup 5) train_limit=45
  [[ $device == cuda* ]] && train_args+=(--peak-size 8192)
  quality_presets=$presets quality_args=(--tokens "$quality_tokens")
fi
for preset in $presets; do
  stage "train_speed/$preset" "$train_limit" python benchmarks/train_speed.py --preset "$preset" --device "$device" \
    --precision bf16 "${train_args[@]}" --output "$out/train_speed/$preset.json"
done

# 4. the rest of the suite, but for the end-to-end tests marked slow (subprocesses on the CPU: CI runs them)
((smoke)) || stage tests 180 python -m pytest -q -m "not gpu and not slow" --junitxml="$out/tests.xml"

# 5. quality (train, then score with and without memory), one preset at a time, while time is left
for preset in $quality_presets; do
  stage "quality/$preset" 300 python benchmarks/quality.py --presets "$preset" --device "$device" --precision bf16 \
    "${quality_args[@]}" --out-dir "$out/quality/runs" --output "$out/quality/$preset.json"
done

# summary: the stages and the figures of every training-speed report, in OUT/summary.json and on stdout
python - "$out" "$device" "$smoke" <<'EOF'
import json, sys
from pathlib import Path

out, device, smoke = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
stages = []
for line in (out / "stages.tsv").read_text().splitlines():
    name, status, rc, ms = line.split("\t")
    stages.append({"stage": name, "status": status, "exit_code": int(rc) if rc else None,
                   "seconds": round(int(ms) / 1000, 1)})
train = {}
for path in sorted((out / "train_speed").glob("*.json")):
    run = json.loads(path.read_text())["results"][0]
    train[path.stem] = {"tokens_per_s": round(run["tokens_per_s"]), "mfu": round(run["mfu"], 4)}
quality = {}
for path in sorted((out / "quality").glob("*.json")):
    for preset, result in json.loads(path.read_text()).get("presets", {}).items():
        quality[preset] = {key: result.get(key) for key in ("tokens_trained", "carry_bpb", "cut_bpb", "delta_bpb")}
summary = {"device": device, "smoke": smoke, "stages": stages, "train_speed_bf16": train, "quality_bpb": quality}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{'preset':24s} {'tokens/s':>10s} {'MFU':>7s}")
for preset, r in train.items():
    print(f"{preset:24s} {r['tokens_per_s']:>10,d} {r['mfu'] * 100:>6.1f}%")
print(f"summary: {out / 'summary.json'}")
EOF
(( failed )) && echo "gpu_check.sh: some stages failed or timed out (see $out/stages.tsv)" >&2
exit "$failed"
