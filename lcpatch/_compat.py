"""The one place that knows which versions of its dependencies lcpatch supports."""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import CacheError, UnsupportedVersionError

# Keep in step with pyproject.toml (dependencies and the `train` extra); CI tests transformers at both ends.
SUPPORTED = {
    "transformers": ">=5.17,<6",
    "torch": ">=2.6,<3",
    "trl": ">=1.0,<2",
    "peft": ">=0.15,<1",
    "accelerate": ">=1.5,<2",
}
TRANSFORMERS_RANGE = SpecifierSet(SUPPORTED["transformers"])


def _transformers_release() -> tuple[int, ...]:
    try:
        return Version(metadata.version("transformers")).release
    except (metadata.PackageNotFoundError, InvalidVersion):
        return (0,)  # the import-time check reports the problem


# Renames inside the supported range; the old names still work there, with a deprecation warning, until 6.0.
# 5.24: the cache argument of forward() / generate() and the output field `past_key_values` became `cache`.
# 5.23: TrainingArguments' `gradient_checkpointing` became `activation_checkpointing`.
_TRANSFORMERS_RELEASE = _transformers_release()
CACHE_ARG = "cache" if _TRANSFORMERS_RELEASE >= (5, 24) else "past_key_values"
CHECKPOINTING_ARG = "activation_checkpointing" if _TRANSFORMERS_RELEASE >= (5, 23) else "gradient_checkpointing"
_OLD_CACHE_ARG = "past_key_values"


def with_cache_argument(kwargs: dict) -> dict:
    """`kwargs` with a cache passed under the old name moved to `CACHE_ARG`, as transformers' own rename does."""
    if CACHE_ARG == _OLD_CACHE_ARG or _OLD_CACHE_ARG not in kwargs:
        return kwargs
    if kwargs.get(CACHE_ARG) is not None:
        raise CacheError(
            f"a cache was passed twice, as `{CACHE_ARG}` and as `{_OLD_CACHE_ARG}`; pass it once, as `{CACHE_ARG}` "
            "(transformers >= 5.24's name)."
        )
    kwargs = dict(kwargs)
    kwargs[CACHE_ARG] = kwargs.pop(_OLD_CACHE_ARG)
    return kwargs


def check_version(package: str, version: str | None = None) -> None:
    """Raise `UnsupportedVersionError` unless `package` (installed, or at `version`) lies in its supported range."""
    supported = SUPPORTED[package]
    if version is None:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError as exc:
            raise UnsupportedVersionError(
                f"lcpatch needs {package}{supported} here, and {package} is not installed. "
                f'Fix: pip install "{package}{supported}" (or pip install "lcpatch[train]").'
            ) from exc
    try:
        parsed = Version(version)
    except InvalidVersion as exc:
        raise UnsupportedVersionError(
            f"lcpatch cannot parse the installed {package} version {version!r}; supported: {package}{supported}."
        ) from exc
    # Local builds (2.13.0+cpu) and pre-releases of a supported version are accepted.
    if not SpecifierSet(supported).contains(Version(parsed.public), prereleases=True):
        raise UnsupportedVersionError(
            f"lcpatch supports {package}{supported}, but {package} {version} is installed. "
            f'Fix: pip install "{package}{supported}".'
        )
