#!/usr/bin/env bash
# One call on a GPU machine: the test suite on CUDA, the benchmarks, and a timed bf16
# training step of the `base` preset (synthetic batch, no loader). Logs and a short
# results table go to $OUT (./gpu_results when unset); the table is printed last.
#
#   bash scripts/gpu_check.sh                 # everything
#   TESTS_TIMEOUT=300 bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-360}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-240}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" > "$OUT/nvidia-smi.txt"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" \
  > "$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; exit 1; }

# 1. A timed bf16 training step of the base preset (first: it is the headline figure).
timeout 300 $PY - > "$OUT/train_step_base.json" 2> "$OUT/train_step_base.log" <<'PYEOF'
import json, time, torch
from vatt_fast.flops import peak_flops, train_step_flops
from vatt_fast.models import create_model
from vatt_fast.nn.losses import VATTLoss

dev = torch.device("cuda")
torch.manual_seed(0)
model = create_model("base", vocab_size=2 ** 16).to(dev)
cfg = model.config
B = 32
batch = {
    "video": torch.randint(0, 256, (B, cfg.num_frames, cfg.frame_size, cfg.frame_size, 3), dtype=torch.uint8, device=dev),
    "audio": torch.randn(B, cfg.audio_samples, device=dev),
    "text": torch.randint(1, cfg.vocab_size, (B, cfg.num_captions, cfg.caption_len), device=dev),
    "text_mask": torch.ones(B, cfg.num_captions, dtype=torch.bool, device=dev),
}
loss_fn = VATTLoss()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-7, fused=True)

def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(batch)
    loss = loss_fn({**out, "text_mask": batch["text_mask"]})["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

for _ in range(3):
    step()
torch.cuda.synchronize()
times = []
for _ in range(10):
    t0 = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
times.sort()
med = times[len(times) // 2]
flops = train_step_flops(cfg, B)
peak = peak_flops(dev, torch.bfloat16)
print(json.dumps({
    "device": torch.cuda.get_device_name(), "preset": "base", "batch": B, "precision": "bf16",
    "step_ms": 1000 * med, "clips_per_s": B / med, "tflops": flops / med / 1e12,
    "mfu": flops / med / peak if peak else None, "loss": float(loss),
    "max_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30,
}))
PYEOF
echo "train step rc=$?" >> "$OUT/status.txt"

# 2. The benchmarks (every kernel and the training step), JSON for the table.
timeout "$BENCH_TIMEOUT" $PY -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
  --benchmark-json "$OUT/benchmarks.json" > "$OUT/benchmarks.log" 2>&1
echo "benchmarks rc=$?" >> "$OUT/status.txt"

# 3. The test suite on CUDA (the device fixture adds cuda; the trainer's CUDA smoke test runs).
timeout "$TESTS_TIMEOUT" $PY -m pytest tests -q -x -p no:cacheprovider --timeout 300 -m "not distributed" \
  --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests rc=$?" >> "$OUT/status.txt"

# Results table, printed last.
$PY - "$OUT" <<'PYEOF' | tee "$OUT/results.md"
import json, os, sys
out = sys.argv[1]
print("| check | result |")
print("| --- | --- |")
for line in open(os.path.join(out, "status.txt")):
    name, rc = line.strip().rsplit(" rc=", 1)
    print(f"| {name} | {'ok' if rc == '0' else 'FAILED (rc ' + rc + ')'} |")
try:
    r = json.load(open(os.path.join(out, "train_step_base.json")))
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
    print(f"| base train step, bf16, batch {r['batch']} ({r['device']}) | {r['step_ms']:.1f} ms, "
          f"{r['clips_per_s']:.1f} clips/s, {r['tflops']:.1f} TFLOP/s, MFU {mfu}, {r['max_mem_gb']:.1f} GB |")
except Exception as e:  # noqa: BLE001
    print(f"| base train step | no result ({e}) |")
try:
    bench = json.load(open(os.path.join(out, "benchmarks.json")))
    for b in bench["benchmarks"]:
        info = b.get("extra_info", {})
        figure = ", ".join(f"{k} {v:.3g}" for k, v in info.items() if isinstance(v, float) and k in ("clips_per_s", "tflops", "gbps", "GB/s", "TFLOP/s", "mfu"))
        print(f"| {b['name']} | {1000 * b['stats']['median']:.3f} ms{', ' + figure if figure else ''} |")
except Exception as e:  # noqa: BLE001
    print(f"| benchmarks | no results ({e}) |")
tail = open(os.path.join(out, "tests.log")).read().strip().splitlines()[-1:] if os.path.exists(os.path.join(out, "tests.log")) else ["?"]
print(f"| test suite on CUDA | {tail[0] if tail else '?'} |")
PYEOF
