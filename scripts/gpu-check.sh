#!/usr/bin/env bash
# GPU check of a prebuilt CUDA neurosteer, for a machine with an NVIDIA GPU and its driver but
# no network and no Rust toolchain. In about 8 minutes at most it:
#   1. compares `activations --device cuda` logits (f32 and bf16 weights) with the reference
#      logits of tiny-llama3, tiny-gpt2 and stories260K (shared/fixtures), and the boolq
#      prompt's layer-1 TransformerLens hooks with reference_hooks.safetensors;
#   2. compares `generate --device cuda` greedy ids with the references (batch 1 and 5);
#   3. runs `bench` on a random llama-3.1-8b in bf16 (batch 1, 8, 32), then with
#      --steer-features 65536 and --experiment 300 (the original experiment's shape: 300 prompts
#      of 160 tokens, Base + 3 strengths, 50 new tokens, a 65,536-feature transcoder at layer 0,
#      its wall time);
# and writes everything to $OUT/gpu-check.json (OUT defaults to ./gpu-check-out), with the
# commands' logs beside it. Exit status 0 when every correctness check passed.
#
#   scripts/gpu-check.sh [BINARY]
#
# BINARY (or $NEUROSTEER_BIN): the CUDA build of neurosteer, as is or compressed (.xz, .gz); by
#   default the first of ./neurosteer-cuda[.xz|.gz], dist-cuda/neurosteer, target/release/neurosteer.
#   To carry it in 64 MiB: strip -o neurosteer-cuda target/release/neurosteer && xz -T0 neurosteer-cuda
# Fixtures: $NEUROSTEER_SHARED, else shared/ in the repository root, else ../shared.
# CUDA libraries (the binary's NEEDED: libcublas.so.13 with libcublasLt.so.13, libcurand.so.10,
#   libcudart.so.13; libcuda.so.1 is the driver's), looked for in: $NEUROSTEER_CUDA_LIBS, a lib/
#   beside the binary (what `scripts/cuda-toolkit.sh bundle` makes), the nvidia/cu13/lib folders
#   of python3's site-packages (PyTorch's CUDA 13 wheels), /usr/local/cuda.
# Needs bash and python3 (standard library only: safetensors files are read with struct+json).
# GPU_CHECK_BUDGET_S (default 450) bounds the whole run; later steps are skipped when short.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-check-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

bin="${1:-${NEUROSTEER_BIN:-}}"
if [ -z "$bin" ]; then
  for c in ./neurosteer-cuda ./neurosteer-cuda.xz ./neurosteer-cuda.gz dist-cuda/neurosteer target/release/neurosteer; do
    [ -f "$c" ] && { bin="$c"; break; }
  done
fi
[ -n "$bin" ] && [ -f "$bin" ] || { echo "gpu-check: no neurosteer binary (give its path)" >&2; exit 2; }
# A compressed binary (the stripped CUDA build is about 68 MB, 10 MB with xz) is unpacked to /tmp.
case "$bin" in
  *.xz) xz -dc "$bin" >/tmp/neurosteer-cuda && chmod +x /tmp/neurosteer-cuda && bin=/tmp/neurosteer-cuda || exit 2 ;;
  *.gz) gzip -dc "$bin" >/tmp/neurosteer-cuda && chmod +x /tmp/neurosteer-cuda && bin=/tmp/neurosteer-cuda || exit 2 ;;
esac
[ -x "$bin" ] || chmod +x "$bin"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

shared="${NEUROSTEER_SHARED:-}"
if [ -z "$shared" ]; then
  for c in shared ../shared; do [ -d "$c/fixtures" ] && { shared="$c"; break; }; done
fi
[ -n "$shared" ] && [ -d "$shared/fixtures" ] || { echo "gpu-check: no shared/fixtures folder" >&2; exit 2; }
shared="$(cd "$shared" && pwd)"

# Folders that may hold the CUDA 13 libraries, best first; a stubs/ folder is never added.
libdirs=()
[ -n "${NEUROSTEER_CUDA_LIBS:-}" ] && libdirs+=("$NEUROSTEER_CUDA_LIBS")
libdirs+=("$(dirname "$bin")/lib")
if command -v python3 >/dev/null 2>&1; then
  while IFS= read -r d; do libdirs+=("$d"); done < <(python3 - <<'PY' 2>/dev/null
import glob, os, site, sys
roots = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
try:
    roots += site.getsitepackages()
except Exception:
    pass
seen = set()
for r in roots:
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "cu13", "lib"))) + sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if d not in seen:
            seen.add(d)
            print(d)
PY
)
fi
libdirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/lib)
ldpath=""
for d in "${libdirs[@]}"; do
  [ -d "$d" ] && ls "$d"/lib*.so* >/dev/null 2>&1 && ldpath="${ldpath:+$ldpath:}$d"
done
export LD_LIBRARY_PATH="${ldpath}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$bin" >"$OUT/ldd.txt" 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>&1 || true

export GPU_CHECK_BIN="$bin" GPU_CHECK_SHARED="$shared" GPU_CHECK_OUT="$OUT"
exec python3 - <<'PY'
import json, math, os, struct, subprocess, sys, time
from array import array

T0 = time.time()
BUDGET = float(os.environ.get("GPU_CHECK_BUDGET_S", "450"))
BIN = os.environ["GPU_CHECK_BIN"]
SHARED = os.environ["GPU_CHECK_SHARED"]
OUT = os.environ["GPU_CHECK_OUT"]
TMP = os.path.join(OUT, "tmp")
os.makedirs(TMP, exist_ok=True)
LOG = open(os.path.join(OUT, "gpu-check.log"), "w")
report = {
    "binary": BIN,
    "shared": SHARED,
    "ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
    "nvidia_smi": open(os.path.join(OUT, "nvidia-smi.txt")).read().strip(),
    "ldd_not_found": [l.strip() for l in open(os.path.join(OUT, "ldd.txt")) if "not found" in l],
    "ldd_cuda": [l.strip() for l in open(os.path.join(OUT, "ldd.txt"))
                 if any(k in l for k in ("cuda", "cublas", "curand", "nvrtc"))],
    "steps": {},
    "failures": [],
}


def save():
    report["elapsed_s"] = round(time.time() - T0, 1)
    tmp = os.path.join(OUT, "gpu-check.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(OUT, "gpu-check.json"))


def left():
    return BUDGET - (time.time() - T0)


def run(args, cap, stdout_file=None):
    """Runs the binary; returns (rc, seconds, stdout text). rc None means skipped or timed out."""
    t = min(cap, left() - 5)
    if t < 5:
        return None, 0.0, "skipped: out of time"
    cmd = [BIN] + args
    LOG.write("$ " + " ".join(cmd) + "\n")
    LOG.flush()
    s = time.time()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=t)
    except subprocess.TimeoutExpired as e:
        LOG.write(f"timed out after {t:.0f} s\n{(e.stderr or b'').decode(errors='replace')[-4000:]}\n")
        return None, time.time() - s, f"timed out after {t:.0f} s"
    dt = time.time() - s
    err = p.stderr.decode(errors="replace")
    LOG.write(err[-4000:] + f"\n[rc {p.returncode}, {dt:.1f} s]\n")
    LOG.flush()
    out = p.stdout.decode(errors="replace")
    if stdout_file:
        with open(stdout_file, "w") as f:
            f.write(out)
    return p.returncode, dt, out if p.returncode == 0 else (out + err)[-2000:]


def read_safetensors(path, names=None):
    """{name: (shape, flat values)} for F32/I64/I32 tensors (others as None), standard library only."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, meta in header.items():
            if name == "__metadata__" or (names is not None and name not in names):
                continue
            a, b = meta["data_offsets"]
            code = {"F32": "f", "I64": "q", "I32": "i"}.get(meta["dtype"])
            if code is None:
                out[name] = (meta["shape"], None)
                continue
            f.seek(base + a)
            arr = array(code)
            arr.frombytes(f.read(b - a))
            if sys.byteorder != "little":
                arr.byteswap()
            out[name] = (meta["shape"], arr)
        return out


def last_row(shape, flat):
    n = shape[-1]
    return flat[len(flat) - n:]


def centred(v):
    m = math.fsum(v) / len(v)
    return [x - m for x in v]


def max_abs_diff(a, b):
    if len(a) != len(b):
        return float("inf")
    d = 0.0
    for x, y in zip(a, b):
        e = abs(x - y)
        if not e <= d:  # NaN counts as infinite
            d = e if e == e else float("inf")
    return d


def argmax(v):
    return max(range(len(v)), key=v.__getitem__)


MODELS = [
    # name, model folder, its reference folder, --no-bos so that ids are reference.json's input_ids
    ("tiny-llama3", f"{SHARED}/fixtures/tiny-llama3", False),
    ("tiny-gpt2", f"{SHARED}/fixtures/tiny-gpt2", True),
    ("stories260K", f"{SHARED}/assets/stories260K/hf", False),
]
TOL = {"f32": 1e-3, "bf16": 0.15}  # reference tolerance is 1e-4 (PyTorch f32 on CPU)
HOOKS = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]

# 1. activations: final logits and layer-1 hooks
acts = report["steps"]["activations"] = {}
for name, mdir, no_bos in MODELS:
    ref = json.load(open(os.path.join(mdir, "reference.json")))
    acts[name] = {}
    for dtype in ("f32", "bf16"):
        res = acts[name][dtype] = {"prompts": {}}
        for p in ref["prompts"]:
            if not p["text"] and no_bos:
                continue  # the reference runs tiny-gpt2's empty prompt on [bos]
            f = os.path.join(TMP, f"{name}-{dtype}-{p['name']}.safetensors")
            args = ["activations", "--model", mdir, "--prompt", p["text"], "--out", f,
                    "--device", "cuda", "--dtype", dtype] + (["--no-bos"] if no_bos else [])
            rc, dt, out = run(args, 60)
            r = res["prompts"][p["name"]] = {"seconds": round(dt, 2)}
            if rc != 0:
                r["error"] = out.strip()[-600:]
                report["failures"].append(f"activations {name} {dtype} {p['name']}: rc {rc}")
                continue
            t = read_safetensors(f, {"logits", "tokens"})
            os.remove(f)
            got = last_row(*t["logits"])
            want = centred(ref["prompts"][[q["name"] for q in ref["prompts"]].index(p["name"])]["final_logits"])
            r["tokens_match"] = list(t["tokens"][1]) == p["input_ids"]
            r["max_abs_diff"] = max_abs_diff(got, want)
            r["argmax"] = [argmax(got), argmax(want)]
            r["pass"] = r["tokens_match"] and r["max_abs_diff"] <= TOL[dtype] and r["argmax"][0] == r["argmax"][1]
            if not r["pass"]:
                report["failures"].append(f"activations {name} {dtype} {p['name']}: {r}")
        diffs = [r.get("max_abs_diff", float("inf")) for r in res["prompts"].values()]
        res["max_abs_diff"] = max(diffs) if diffs else None
        # boolq with TransformerLens's BOS and the layer-1 hooks
        boolq = next(q for q in ref["prompts"] if q["name"] == "boolq")
        f = os.path.join(TMP, f"{name}-{dtype}-hooks.safetensors")
        args = ["activations", "--model", mdir, "--prompt", boolq["text"], "--out", f, "--device", "cuda", "--dtype", dtype]
        for h in HOOKS:
            args += ["--hook", h]
        rc, dt, out = run(args, 60)
        hk = res["hooks"] = {"seconds": round(dt, 2)}
        if rc != 0:
            hk["error"] = out.strip()[-600:]
            report["failures"].append(f"hooks {name} {dtype}: rc {rc}")
        else:
            got = read_safetensors(f)
            os.remove(f)
            want = read_safetensors(os.path.join(mdir, "reference_hooks.safetensors"))
            hk["tokens_match"] = list(got["tokens"][1]) == list(want["input_ids"][1])
            hk["max_abs_diff"] = {"tl.logits_final": max_abs_diff(last_row(*got["logits"]), list(want["tl.logits_final"][1]))}
            for h in HOOKS:
                if h in got and h in want:
                    hk["max_abs_diff"][h] = max_abs_diff(got[h][1], want[h][1])
            worst = max(hk["max_abs_diff"].values())
            hk["pass"] = hk["tokens_match"] and worst <= TOL[dtype]
            if not hk["pass"]:
                report["failures"].append(f"hooks {name} {dtype}: {hk}")
        save()

# 2. generate: greedy ids, batch 1 and 5 in f32 (must match), batch 5 in bf16 (reported)
gen = report["steps"]["generate"] = {}
for name, mdir, no_bos in MODELS:
    ref = json.load(open(os.path.join(mdir, "reference.json")))
    prompts = [p for p in ref["prompts"] if p["text"] or not no_bos]
    jf = os.path.join(TMP, f"{name}-prompts.jsonl")
    with open(jf, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p["text"]}) + "\n")
    gen[name] = {}
    for dtype, bs in (("f32", 1), ("f32", 5), ("bf16", 5)):
        args = ["generate", "--model", mdir, "--prompts", jf, "--batch-size", str(bs), "--json",
                "--max-new-tokens", str(len(prompts[0]["greedy_ids"])), "--device", "cuda", "--dtype", dtype]
        args += ["--no-bos"] if no_bos else []
        rc, dt, out = run(args, 60)
        g = gen[name][f"{dtype}-batch{bs}"] = {"seconds": round(dt, 2)}
        if rc != 0:
            g["error"] = out.strip()[-600:]
            if dtype == "f32":
                report["failures"].append(f"generate {name} {dtype} batch {bs}: rc {rc}")
            continue
        lines = [json.loads(l) for l in out.splitlines() if l.strip().startswith("{")]
        got = [l.get("new_tokens") for l in lines]
        want = [p["greedy_ids"] for p in prompts]
        g["matching_prompts"] = sum(a == b for a, b in zip(got, want))
        g["prompts"] = len(want)
        g["first_mismatch_at"] = {p["name"]: next((i for i, (x, y) in enumerate(zip(a or [], b)) if x != y), None)
                                  for p, a, b in zip(prompts, got, want) if a != b}
        if dtype == "f32" and g["matching_prompts"] != len(want):
            report["failures"].append(f"generate {name} {dtype} batch {bs}: {g}")
    save()

# 3. bench: random llama-3.1-8b in bf16, then with a 65,536-feature transcoder and the original
#    experiment's shape (300 prompts of BoolQ length, 160 tokens; Base + 3 strengths; 50 new tokens)
bench = report["steps"]["bench"] = {}
for key, extra, cap in (("plain", ["--new-tokens", "16"], 120),
                        ("steer_65536", ["--steer-features", "65536", "--experiment", "300", "--new-tokens", "50"], 300)):
    bf = os.path.join(OUT, f"bench-{key}.json")
    args = ["bench", "--preset", "llama-3.1-8b", "--dtype", "bf16", "--device", "cuda",
            "--batch", "1", "--batch", "8", "--batch", "32", "--prompt-tokens", "160",
            "--out", bf] + extra
    rc, dt, out = run(args, cap, stdout_file=os.path.join(OUT, f"bench-{key}.txt"))
    b = bench[key] = {"seconds": round(dt, 1), "rc": rc}
    if rc == 0 and os.path.exists(bf):
        b["report"] = json.load(open(bf))
    else:
        b["error"] = out.strip()[-600:]
    save()

report["pass"] = not report["failures"]
save()
LOG.close()
for f in os.listdir(TMP):
    os.remove(os.path.join(TMP, f))
os.rmdir(TMP)
print(json.dumps({"pass": report["pass"], "failures": report["failures"][:10], "elapsed_s": report["elapsed_s"],
                  "bench": {k: ([(r["model"], r["batch"], r["decode_step_ms"]) for r in v["report"]["rows"]] if "report" in v else v.get("error"))
                            for k, v in bench.items()},
                  "experiment": [(e["total_s"], e["tokens_per_s"], [(c["name"], round(c["seconds"], 1)) for c in e["configs"]])
                                 for v in bench.values() for e in v.get("report", {}).get("experiments", [])]}, indent=1))
sys.exit(0 if report["pass"] else 1)
PY
