#!/bin/bash
# Routed evaluation on a GPU (ViT-B/32, random weights, batch 256, K = 2, 4, 8): the "experts" and "weights" forms
# give the same outputs on CUDA, then throughput in each form (and "auto", which picks "weights" on CUDA).
#   bash benchmarks/gpu_routed_throughput.sh OUT_DIR [FORMS...]
# Writes OUT_DIR/routed_throughput_gpu_<form>.json (benchmarks/routed_throughput.py --device cuda --parts throughput).
set -euo pipefail
out=${1:?usage: gpu_routed_throughput.sh OUT_DIR [FORMS...]}
shift
forms=${*:-auto experts weights}
mkdir -p "$out"
python - <<'PY'
import torch
from benchmarks.routed_throughput import base_encoder, routed_models
enc = base_encoder("ViT-B-32")
models = {f: routed_models(enc, 4, ("wemoe",), form=f)["wemoe"].cuda() for f in ("experts", "weights")}
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in models["experts"].router_state().items():  # non-trivial, equal routers in both models
        p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        models["weights"].router_state()[name].copy_(p)
    x = torch.randn(64, 3, 224, 224, generator=gen).cuda()
    a, b = models["experts"](x), models["weights"](x)
err = float((a - b).abs().max() / a.abs().max())
print(f"CUDA forms agree: max |experts - weights| / max |out| = {err:.2e}")
assert err < 1e-3, err
PY
for form in $forms; do
  python benchmarks/routed_throughput.py --model ViT-B-32 --device cuda --form "$form" --batch 256 --repeats 5 \
    --threads 8 --parts throughput --out "$out/routed_throughput_gpu_$form.json"
done
