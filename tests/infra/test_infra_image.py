"""infra/Dockerfile, checked offline: the base tag agrees with pyproject.toml and uv.lock, the project
is installed from the lock in cache-friendly layers, and the image runs as the non-root `ray` user."""

from __future__ import annotations

import re

from infra_manifests import REPO, dockerfile_instructions, dockerfile_last, locked_versions, python_minor, ray_pin

BASE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)-cu(?P<cuda>\d+)(@sha256:[0-9a-f]{64})?")


def test_base_image_tag_matches_pinned_ray_python_and_cuda():
    base = dockerfile_last("FROM")
    match = BASE.fullmatch(base)
    assert match, f"final stage must build on an explicit rayproject/ray:X.Y.Z-pyXY-cuNNN tag, got {base!r}"
    assert match["ray"] == ray_pin() == locked_versions()["ray"], (match["ray"], ray_pin(), locked_versions()["ray"])
    assert f"{match['py']}.{match['minor']}" == python_minor()
    # torch's CUDA runtime wheels (uv.lock) and the image's CUDA user space must be the same 12.x.
    runtime = locked_versions()["nvidia-cuda-runtime-cu12"]
    assert match["cuda"] == "".join(runtime.split(".")[:2]), f"cu{match['cuda']} vs CUDA runtime {runtime} in uv.lock"


def test_build_time_version_assertion_matches_the_pin():
    asserted = re.findall(r"ray\.__version__ == '([^']+)'", (REPO / "infra" / "Dockerfile").read_text())
    assert asserted and set(asserted) == {ray_pin()}


def test_runs_as_the_base_images_non_root_ray_user():
    users = [args for kw, args in dockerfile_instructions() if kw == "USER"]
    assert users and users[-1] in ("ray", "1000", "1000:100"), users
    assert "root" not in users[-1] and not users[-1].startswith("0")


def test_installs_from_uv_lock_dependencies_before_source():
    steps = dockerfile_instructions()
    syncs = [i for i, (kw, args) in enumerate(steps) if kw == "RUN" and "uv sync" in args]
    assert len(syncs) == 2, "one uv sync for the dependencies layer, one for the project"
    for i in syncs:
        assert "--frozen" in steps[i][1] and "--no-dev" in steps[i][1], steps[i][1]
    deps, project = syncs
    assert "--no-install-project" in steps[deps][1] and "--no-install-project" not in steps[project][1]
    copies = [(i, args) for i, (kw, args) in enumerate(steps) if kw == "COPY" and "--from" not in args]
    lock_copy = next(i for i, args in copies if "uv.lock" in args)
    sources = [i for i, args in copies if "platform/" in args]
    assert lock_copy < deps < min(sources) < project, "dependency layer must not depend on the source tree"
    assert "pyproject.toml" in steps[lock_copy][1] and "platform" not in steps[lock_copy][1]


def test_copied_paths_exist_and_cover_what_entrypoints_run():
    copied = set()
    for kw, args in dockerfile_instructions():
        if kw != "COPY" or "--from" in args:
            continue
        *sources, _dest = [word for word in args.split() if not word.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
            copied.add(source.rstrip("/"))
    assert {"pyproject.toml", "uv.lock", "platform", "jobs", "pipelines"} <= copied


def test_uv_is_pinned():
    uv = [args for kw, args in dockerfile_instructions() if kw == "COPY" and "astral-sh/uv" in args]
    assert uv and re.search(r"astral-sh/uv:\d+\.\d+\.\d+ ", uv[0]), "pin the uv image, never :latest"


def test_dockerignore_keeps_venv_and_git_out_of_the_context():
    ignore = REPO / ".dockerignore"
    assert ignore.exists(), ".dockerignore at the repo root keeps the multi-GiB .venv out of the build context"
    entries = {line.strip().strip("/") for line in ignore.read_text().splitlines()}
    assert {".venv", ".git"} <= entries, entries
