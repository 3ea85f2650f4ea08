"""Every build variant of the C++ kernels against a float64 torch reference (`kernel_check.py`).

The engine builds with `-march=native`. This machine has AVX-512, so the suite also builds the same sources
with AVX-512 switched off (the AVX2+FMA paths, with torch itself held to AVX2 by ATEN_CPU_CAPABILITY) and with
`-DSB_FORCE_SCALAR` (the reference loops), each in its own child process (one process registers the
`switchboard` library once) into the test cache, keyed by the sources' hash. The first run builds each variant
(about a minute on 2 cores); later runs load them in a second or two.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # builds the kernels again, in a child process

from backends.local.engine.kernels import kernels_dir, kernels_disabled, source_digest  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).resolve().parent / "kernel_check.py"
EXPECTED_ISA = {"avx2": "avx2+fma", "scalar": "scalar"}


@pytest.mark.parametrize("variant", ["native", "avx2", "scalar"])
def test_kernel_variant_matches_float64_reference(variant: str) -> None:
    if kernels_disabled():
        pytest.skip("SWITCHBOARD_KERNELS=off")
    build = kernels_dir() / f"check-{variant}-{source_digest()}"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    if variant != "native":
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    done = subprocess.run(
        [sys.executable, str(CHECK), variant, str(build)],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kernels ok: {variant}" in done.stdout
    if variant in EXPECTED_ISA:
        assert done.stdout.split()[-1] == EXPECTED_ISA[variant], done.stdout


@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod"])
def test_neon_paths_match_double_loops_under_qemu(march: str, tmp_path: Path) -> None:
    """The torch-free kernel bodies cross-compiled for aarch64 (NEON, with and without `sdot`), run by qemu.

    Needs Debian's `g++-aarch64-linux-gnu` and `qemu-user`; skipped, saying so, where they are not installed.
    """
    import shutil

    compiler, emulator = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if compiler is None or emulator is None:
        pytest.skip(
            "NEON check needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt: g++-aarch64-linux-gnu qemu-user)"
        )
    binary = tmp_path / "neon_check"
    csrc = ROOT / "backends" / "local" / "engine" / "csrc"
    subprocess.run(
        [compiler, "-O2", "-std=c++17", f"-march={march}", "-static", f"-I{csrc}", "-w",
         str(CHECK.with_name("neon_check.cpp")), "-o", str(binary)],
        check=True, timeout=120,
    )  # fmt: skip
    done = subprocess.run([emulator, str(binary)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.startswith("neon ok neon"), done.stdout + done.stderr


def test_a_finished_build_loads_without_torchs_builder() -> None:
    """A start whose library was built and loaded before loads it directly: torch's builder (which reruns
    ninja and leaves setuptools imported, ~4 MB resident) runs only for a build with other flags."""
    if kernels_disabled():
        pytest.skip("SWITCHBOARD_KERNELS=off")
    from backends.local.engine.kernels import built_marker

    script = (
        "import sys; from backends.local.engine import kernels; print(kernels.kernel_isa()); "
        "print(sorted(m for m in ('setuptools', 'torch.utils.cpp_extension') if m in sys.modules))"
    )

    def start() -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split("\n")[-3:-1]

    start()  # builds, or finds the build a test before made
    marker = built_marker()
    flags = marker.read_text()
    isa, imported = start()
    assert isa != "off" and imported == "[]"
    marker.write_text('["-O0"]')  # a build with other flags is not this one: the builder runs again
    isa_again, imported = start()
    assert isa_again == isa and imported == "['setuptools', 'torch.utils.cpp_extension']"
    assert marker.read_text() == flags
