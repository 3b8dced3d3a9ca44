"""The one place that knows which transformers versions lcpatch supports."""

from __future__ import annotations

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from .errors import UnsupportedVersionError

# Keep in step with `dependencies` in pyproject.toml; CI tests both ends.
TRANSFORMERS_RANGE = SpecifierSet(">=5.17,<6")


def check_transformers_version(version: str) -> None:
    """Raise `UnsupportedVersionError` unless `version` lies in `TRANSFORMERS_RANGE`."""
    try:
        parsed = Version(version)
    except InvalidVersion as exc:
        raise UnsupportedVersionError(
            f"lcpatch cannot parse the installed transformers version {version!r}; "
            f"supported: transformers{TRANSFORMERS_RANGE}."
        ) from exc
    if not TRANSFORMERS_RANGE.contains(parsed, prereleases=True):
        raise UnsupportedVersionError(
            f"lcpatch supports transformers{TRANSFORMERS_RANGE}, but transformers {version} is installed. "
            f'Fix: pip install "transformers{TRANSFORMERS_RANGE}".'
        )
