#!/usr/bin/env bash
# Compile every Concord CUDA kernel without a GPU: NVRTC to PTX for compute_80 and compute_90,
# then ptxas for sm_80 and sm_90. Fails on any compile error, any ptxas error, a missing kernel
# or any register spill. Needs the pip wheels nvidia-cuda-nvrtc-cu12 (NVRTC),
# nvidia-cuda-runtime-cu12 (headers) and nvidia-cuda-nvcc-cu12 (ptxas); where they cannot be
# installed it prints "SKIP: <reason>" and exits 0 (the only case that exits 0 without checking).
#
# Environment:
#   CONCORD_CUDA_SRC     kernel source to check (default: dumped by the dump-cuda-src example)
#   CONCORD_CUDA_CI_DIR  work directory with the venv and outputs (default: <target>/cuda-ci)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=${CONCORD_CUDA_CI_DIR:-${CARGO_TARGET_DIR:-$root/target}/cuda-ci}
venv=$work/venv
mkdir -p "$work"

skip() {
    echo "SKIP: $*" >&2
    echo "SKIP: $*"
    exit 0
}

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >/dev/null 2>&1 || skip "cannot create a Python venv (python3 -m venv failed)"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
nvrtc_lib=$site/nvidia/cuda_nvrtc/lib/libnvrtc.so.12
ptxas=$site/nvidia/cuda_nvcc/bin/ptxas
if [ ! -e "$nvrtc_lib" ] || [ ! -x "$ptxas" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check --timeout 20 --retries 1 \
        nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12 >&2 \
        || skip "pip could not install nvidia-cuda-{nvrtc,runtime,nvcc}-cu12 (offline, or no wheels for this platform)"
fi
[ -e "$nvrtc_lib" ] || skip "the nvidia-cuda-nvrtc-cu12 wheel has no $nvrtc_lib on this platform"
[ -x "$ptxas" ] || skip "the nvidia-cuda-nvcc-cu12 wheel has no ptxas on this platform"

src=${CONCORD_CUDA_SRC:-}
if [ -z "$src" ]; then
    src=$work/kernels.cu
    (cd "$root" && cargo run --quiet -p concord-kernels --example dump-cuda-src) >"$src"
fi

"$venv/bin/python" - "$src" "$work" "$nvrtc_lib" "$ptxas" "$site/nvidia/cuda_runtime/include" <<'PY'
import ctypes, re, subprocess, sys

src_path, work, nvrtc_path, ptxas, include_dir = sys.argv[1:6]
source = open(src_path, "rb").read()
first = source.split(b"\n", 1)[0].decode()
if not first.startswith("// nvrtc-options:"):
    sys.exit(f"FAIL: {src_path} does not start with the nvrtc-options line")
options = first.split(":", 1)[1].split()

# The kernels the source promises, from its instantiation lines.
text = source.decode()
expected = set()
for op, dt in re.findall(r"^CONCORD_REDUCE\((\w+), \w+, (\w+), \w+\)$", text, re.M):
    expected.add(f"concord_reduce_{op}_{dt}")
for dt in re.findall(r"^CONCORD_AVG\((\w+), \w+\)$", text, re.M):
    expected |= {f"concord_reduce_finish_avg_{dt}", f"concord_finish_avg_{dt}"}
if len(expected) < 3 * 12:
    sys.exit(f"FAIL: only {len(expected)} kernels found in the source")

nvrtc = ctypes.CDLL(nvrtc_path)
major, minor = ctypes.c_int(), ctypes.c_int()
nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
print(f"NVRTC {major.value}.{minor.value}, options {' '.join(options)}")

def check(rc, what):
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise SystemExit(f"FAIL: {what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")

failed = False
for arch in ("80", "90"):
    prog = ctypes.c_void_p()
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source, b"concord_kernels.cu", 0, None, None), "create")
    opts = [o.encode() for o in options] + [f"--gpu-architecture=compute_{arch}".encode(), f"-I{include_dir}".encode()]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode())
    check(rc, f"NVRTC compile for compute_{arch}")
    nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetPTX(prog, ptx), "get PTX")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    ptx_path = f"{work}/concord_kernels_compute_{arch}.ptx"
    open(ptx_path, "wb").write(ptx.value)

    entries = set(re.findall(r"\.entry (\w+)\(", ptx.value.decode()))
    missing = expected - entries
    if missing:
        print(f"FAIL: compute_{arch}: kernels missing from the PTX: {sorted(missing)}")
        failed = True

    run = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", "-o", f"{work}/concord_kernels_sm_{arch}.cubin", ptx_path],
                         capture_output=True, text=True)
    out = run.stdout + run.stderr
    if run.returncode != 0 or re.search(r"\berror\b", out, re.I):
        print(out)
        print(f"FAIL: ptxas sm_{arch} exited {run.returncode}")
        failed = True
        continue
    stats, current = {}, None
    for line in out.splitlines():
        m = re.search(r"Function properties for (\w+)", line) or re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            stats.setdefault(current, {})
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            stats[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            stats[current]["regs"] = int(m.group(1))
    spills = {k: v for k, v in stats.items() if v.get("spill_st", 0) or v.get("spill_ld", 0)}
    regs = [v.get("regs", 0) for v in stats.values()]
    stack = max((v.get("stack", 0) for v in stats.values()), default=0)
    print(f"sm_{arch}: {len(stats)} kernels assembled, registers {min(regs)}..{max(regs)}, "
          f"max stack frame {stack} bytes, spills: {len(spills)}")
    for k, v in sorted(spills.items()):
        print(f"FAIL: sm_{arch} {k} spills: {v}")
        failed = True
    for warn in re.findall(r"^ptxas warning.*$", out, re.M):
        print(warn)

if failed:
    sys.exit(1)
print(f"OK: {len(expected)} kernels compiled for compute_80/compute_90 and assembled for sm_80/sm_90 without spills")
PY
