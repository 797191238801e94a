"""Template recipes: small TOML files a user can copy to make a template of their own.

A recipe names apt packages, pip packages, files to copy in, shell commands
to run in the new root, environment variables and the default vcpus, memory
and disk of sandboxes made from it; `extends = "base"` starts from another
recipe. Validation is strict: an unknown field or a wrong type is an error
naming the file and the field, with a hint.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from images.errors import RecipeError
from images.manifest import TemplateDefaults

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
APT_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?(=[A-Za-z0-9.+~:-]+)?$")
PIP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?\s*([<>=!~]=?[^;\s]+,?)*$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TOP_FIELDS = ("description", "extends", "apt", "pip", "files", "run", "env", "defaults")
FILE_FIELDS = ("src", "dest", "mode")
DEFAULT_LIMITS = {"vcpus": (1, 64), "memory_mb": (128, 262144), "disk_mb": (256, 1048576)}


@dataclass(frozen=True)
class FileCopy:
    src: Path  # absolute, on the host
    dest: str  # absolute, in the guest
    mode: int | None = None


@dataclass(frozen=True)
class Recipe:
    """A recipe with its `extends` chain already merged in."""

    name: str
    path: Path
    description: str = ""
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    files: tuple[FileCopy, ...] = ()
    run: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    defaults: TemplateDefaults = field(default_factory=TemplateDefaults)
    # Every file this recipe was read from (itself and what it extends), for the hash.
    sources: tuple[Path, ...] = ()

    def digest(self) -> str:
        """Hash of the merged recipe, the recipe files and the files it copies in."""
        h = hashlib.sha256()
        data = asdict(self)
        data.pop("path")
        data.pop("sources")
        data["files"] = [(str(f.src.name), f.dest, f.mode) for f in self.files]
        h.update(json.dumps(data, sort_keys=True, default=str).encode())
        for src in self.sources:
            h.update(src.read_bytes())
        for f in self.files:
            h.update(_file_bytes(f.src))
        return h.hexdigest()


def _file_bytes(src: Path) -> bytes:
    if src.is_dir():
        h = hashlib.sha256()
        for p in sorted(src.rglob("*")):
            h.update(str(p.relative_to(src)).encode())
            if p.is_file():
                h.update(p.read_bytes())
        return h.digest()
    return src.read_bytes()


def known_templates(extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    names: set[str] = set()
    for d in (*extra_dirs, RECIPES_DIR):
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def find_recipe(name_or_path: str, extra_dirs: tuple[Path, ...] = ()) -> Path:
    """A template name (looked up in extra_dirs, then the built-in recipes) or a .toml path."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        p = Path(name_or_path).resolve()
        if not p.is_file():
            raise RecipeError(f"recipe file {name_or_path} does not exist")
        return p
    for d in (*extra_dirs, RECIPES_DIR):
        p = d / f"{name_or_path}.toml"
        if p.is_file():
            return p.resolve()
    known = known_templates(extra_dirs)
    hint = difflib.get_close_matches(name_or_path, known, n=1)
    did = f"; did you mean {hint[0]!r}?" if hint else ""
    raise RecipeError(
        f"unknown template {name_or_path!r}{did} known templates: {', '.join(known) or 'none'}"
    )


def _unknown(path: Path, where: str, key: str, allowed: tuple[str, ...]) -> RecipeError:
    hint = difflib.get_close_matches(key, allowed, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return RecipeError(
        f"{path}: unknown field {where}{key!r}{did}; allowed fields: {', '.join(allowed)}"
    )


def _str_list(path: Path, key: str, value: Any, pattern: re.Pattern[str] | None) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{path}: field {key!r} must be a list of strings, got {value!r}")
    if pattern is not None:
        for v in value:
            if not pattern.match(v.strip()):
                raise RecipeError(f"{path}: field {key!r}: {v!r} is not a valid package spec")
    return [v.strip() for v in value]


def _parse_files(path: Path, value: Any) -> list[FileCopy]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise RecipeError(
            f"{path}: field 'files' must be an array of tables ([[files]] src=..., dest=...)"
        )
    out = []
    for i, entry in enumerate(value):
        where = f"files[{i}]."
        for key in entry:
            if key not in FILE_FIELDS:
                raise _unknown(path, where, key, FILE_FIELDS)
        for key in ("src", "dest"):
            if not isinstance(entry.get(key), str):
                raise RecipeError(f"{path}: field {where}{key} is required and must be a string")
        src = (path.parent / entry["src"]).resolve()
        if not src.exists():
            raise RecipeError(f"{path}: field {where}src: {src} does not exist")
        dest = entry["dest"]
        if not dest.startswith("/") or ".." in dest.split("/"):
            raise RecipeError(f"{path}: field {where}dest must be an absolute guest path: {dest!r}")
        mode = entry.get("mode")
        if mode is not None:
            if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", mode):
                raise RecipeError(f"{path}: field {where}mode must be an octal string like '0644'")
            mode = int(mode, 8)
        out.append(FileCopy(src, dest, mode))
    return out


def _parse_defaults(path: Path, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: field 'defaults' must be a table")
    out = {}
    for key, v in value.items():
        if key not in DEFAULT_LIMITS:
            raise _unknown(path, "defaults.", key, tuple(DEFAULT_LIMITS))
        lo, hi = DEFAULT_LIMITS[key]
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise RecipeError(f"{path}: field defaults.{key} must be an integer in [{lo}, {hi}]")
        out[key] = v
    return out


def _parse_env(path: Path, value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RecipeError(f"{path}: field 'env' must be a table of NAME = \"value\"")
    for k, v in value.items():
        if not ENV_RE.match(k):
            raise RecipeError(f"{path}: field env.{k}: not a valid environment variable name")
        if not isinstance(v, str):
            raise RecipeError(f"{path}: field env.{k} must be a string")
    return dict(value)


def load_recipe(
    name_or_path: str, extra_dirs: tuple[Path, ...] = (), _seen: tuple[Path, ...] = ()
) -> Recipe:
    """Read, validate and merge a recipe with the chain it extends."""
    path = find_recipe(name_or_path, extra_dirs)
    if path in _seen:
        chain = " -> ".join(p.stem for p in (*_seen, path))
        raise RecipeError(f"{path}: field 'extends' makes a cycle: {chain}")
    name = path.stem
    if not NAME_RE.match(name):
        raise RecipeError(f"{path}: template name {name!r} must match {NAME_RE.pattern}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    for key in raw:
        if key not in TOP_FIELDS:
            raise _unknown(path, "", key, TOP_FIELDS)
    desc = raw.get("description", "")
    if not isinstance(desc, str):
        raise RecipeError(f"{path}: field 'description' must be a string")
    apt = _str_list(path, "apt", raw.get("apt", []), APT_RE)
    pip = _str_list(path, "pip", raw.get("pip", []), PIP_RE)
    run = _str_list(path, "run", raw.get("run", []), None)
    files = _parse_files(path, raw.get("files", []))
    env = _parse_env(path, raw.get("env", {}))
    defaults = _parse_defaults(path, raw.get("defaults", {}))

    parent: Recipe | None = None
    if "extends" in raw:
        if not isinstance(raw["extends"], str):
            raise RecipeError(f"{path}: field 'extends' must be a template name")
        dirs = (path.parent, *extra_dirs)
        try:
            parent = load_recipe(raw["extends"], dirs, (*_seen, path))
        except RecipeError as e:
            if str(e).startswith("unknown template"):
                raise RecipeError(f"{path}: field 'extends': {e}") from None
            raise
    if parent is None:
        base_defaults = asdict(TemplateDefaults())
        return Recipe(
            name, path, desc, tuple(dict.fromkeys(apt)), tuple(dict.fromkeys(pip)),
            tuple(files), tuple(run), env, TemplateDefaults(**{**base_defaults, **defaults}),
            (path,),
        )  # fmt: skip
    return Recipe(
        name=name,
        path=path,
        description=desc or parent.description,
        apt=tuple(dict.fromkeys([*parent.apt, *apt])),
        pip=tuple(dict.fromkeys([*parent.pip, *pip])),
        files=(*parent.files, *files),
        run=(*parent.run, *run),
        env={**parent.env, **env},
        defaults=TemplateDefaults(**{**asdict(parent.defaults), **defaults}),
        sources=(*parent.sources, path),
    )
