"""The Dockerfile installs exactly what requirements.txt pins (no Docker engine runs in CI: this reads the file)."""

import re

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def requirement_pins() -> dict[str, str]:
    """{package: version} of every `name==version` line of requirements.txt."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#;]+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def instructions() -> list[str]:
    """The Dockerfile's instructions, comments dropped and continuation lines joined."""
    text = "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#"))
    return [" ".join(part.split()) for part in re.sub(r"\\\n", " ", text).split("\n") if part.strip()]


def test_base_image_torch_is_the_pinned_torch():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:[0-9.]+-cuda[0-9.]+-cudnn[0-9]+-devel", base), (
        f"{base}: expected an official PyTorch CUDA devel image (nvcc for DeepSpeed's ops)"
    )
    assert base.split(":")[1].split("-")[0] == requirement_pins()["torch"]
    assert any(line.startswith("FROM ${BASE_IMAGE}") for line in instructions())


def test_every_version_in_the_dockerfile_agrees_with_requirements():
    pins = requirement_pins()
    written = re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][^\s\"'\\)]*)", DOCKERFILE)
    for name, version in written:
        assert name.lower() in pins and pins[name.lower()] == version, f"Dockerfile pins {name}=={version}"


def test_installs_requirements_and_prebuilds_deepspeed_at_its_pin():
    run = next(line for line in instructions() if line.startswith("RUN python -m pip install -r requirements.txt"))
    assert any(line == "COPY requirements.txt ." for line in instructions())
    # DeepSpeed is reinstalled with its ops built, at the version read from requirements.txt (never typed twice).
    assert "DS_BUILD_CPU_ADAM=1" in run and "DS_BUILD_FUSED_ADAM=1" in run
    assert "$(grep -E '^deepspeed==' requirements.txt)" in run and "--no-build-isolation" in run
    assert "deepspeed" in requirement_pins()


def test_runs_as_a_non_root_user_and_shows_help_by_default():
    lines = instructions()
    user = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    assert lines.index(next(line for line in lines if line.startswith("USER "))) > lines.index(
        next(line for line in lines if line.startswith("COPY --chown"))
    )
    assert lines[-1] == 'CMD ["python", "train_bert.py", "--help"]'
    assert (ROOT / ".dockerignore").is_file() and ".venv" in (ROOT / ".dockerignore").read_text()
