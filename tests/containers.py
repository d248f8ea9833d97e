"""Docker helpers for the container tests: the engine, a local base image and the training image.

No image registry is reachable from the test machines, so every image is built here and nothing
may trigger a pull. The base image is a Debian root filesystem made with ``debootstrap`` and
imported with ``docker import``. The training image is built from ``Dockerfile.train`` with
wheels that the host's pip downloads into ``wheelhouse/train/``. Each step is skipped when its
result exists, so only the first session on a machine pays for the build.

Every image and container made here carries the label ``ml-loop.test=1``, which lists them all:
``docker ps -a --filter label=ml-loop.test=1``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "docker"
# A folder of its own, because other builds may put their wheels into wheelhouse/.
WHEELHOUSE_DIR = REPO_ROOT / "wheelhouse" / "train"
TRAIN_DOCKERFILE = "Dockerfile.train"
TRAIN_REQUIREMENTS = "requirements-train.txt"
CONSTRAINTS = "constraints.txt"

TEST_LABEL = {"ml-loop.test": "1"}
BASE_IMAGE = "ml-loop-test/debian-python:bookworm"
TRAIN_IMAGE_REPOSITORY = "ml-loop-test/train"
DEBIAN_SUITE = "bookworm"
DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_MIRROR_ENV = "ML_LOOP_DEBIAN_MIRROR"
# The wheelhouse path inside the build stage of Dockerfile.train.
IMAGE_WHEELHOUSE = "/tmp/ml-loop-build"

ENGINE_HINT = (
    "start a Docker engine (as root: dockerd --iptables=false --ip-masq=false --bridge=none, "
    "which .ci/run does) or point DOCKER_HOST at a running one"
)
BUILD_LOG_TAIL_LINES = 60
KEPT_TRAIN_IMAGES = 3

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """A test image could not be built; the message ends with the tail of the build log."""


class PrerequisiteMissingError(RuntimeError):
    """A tool that building the base image needs is missing; the message names the way to get it."""


@dataclasses.dataclass(frozen=True)
class ContainerResult:
    """Exit code and output of a container that ran to its end."""

    exit_code: int
    stdout: str
    stderr: str


def connect_engine(timeout_s: float = 300) -> tuple[docker.DockerClient | None, str]:
    """Return ``(client, "")`` when the engine of ``DOCKER_HOST`` responds to a ping.

    Without an engine, return ``(None, reason)``, where the reason names the engine address, the
    error and how to start one. ``timeout_s`` is the client's timeout for every API call: image
    listings can take a minute on an engine busy with builds.
    """
    address = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=timeout_s)
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
        return None, f"no Docker engine responds at {address} ({err}); {ENGINE_HINT}"
    return client, ""


def host_user() -> str:
    """Return ``uid:gid`` of this process, the user to run containers as on a bind mount.

    Files that the container writes into a bind-mounted folder then belong to the host user.
    """
    return f"{os.getuid()}:{os.getgid()}"


def debian_mirror() -> str:
    """Return the Debian mirror for debootstrap: ``$ML_LOOP_DEBIAN_MIRROR``, else the host's.

    The host's mirror is the first APT source of the suite ``bookworm``, read from the deb822
    files in ``/etc/apt/sources.list.d`` and from ``/etc/apt/sources.list``.
    """
    configured = os.environ.get(DEBIAN_MIRROR_ENV)
    if configured:
        return configured
    apt = Path("/etc/apt")
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.+)$", stanza, flags=re.MULTILINE))
            if DEBIAN_SUITE in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    sources_list = apt / "sources.list"
    if sources_list.is_file():
        for line in sources_list.read_text(errors="replace").splitlines():
            match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if match and match.group(2) == DEBIAN_SUITE:
                return match.group(1)
    return DEFAULT_DEBIAN_MIRROR


def image_exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


@contextlib.contextmanager
def build_lock(cache_dir: Path = CACHE_DIR) -> Iterator[None]:
    """Hold an exclusive file lock, so that two test sessions never build at the same time."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / "build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_base_image(
    client: docker.DockerClient, cache_dir: Path = CACHE_DIR, progress: Progress = logger.info
) -> str:
    """Make sure the local base image ``BASE_IMAGE`` exists; return its name.

    The image is a minimal Debian bookworm with Python 3.11, venv and CA certificates. Its root
    filesystem is kept as a tarball in ``cache_dir``, so a removed image is imported again without
    running debootstrap. Raises PrerequisiteMissingError when debootstrap must run but is missing
    or this process is not root.
    """
    if image_exists(client, BASE_IMAGE):
        return BASE_IMAGE
    tarball = cache_dir / f"debian-python-{DEBIAN_SUITE}.tar"
    if not tarball.is_file():
        _debootstrap_tarball(tarball, progress)
    progress(f"importing {tarball} as {BASE_IMAGE}")
    repository, tag = BASE_IMAGE.rsplit(":", 1)
    client.api.import_image_from_file(
        str(tarball),
        repository=repository,
        tag=tag,
        changes=[
            'ENV PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"',
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
            "LABEL ml-loop.test=1",
        ],
    )
    return BASE_IMAGE


def _debootstrap_tarball(tarball: Path, progress: Progress) -> None:
    command_hint = (
        f"debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "
        f"{DEBIAN_SUITE} DIR {DEFAULT_DEBIAN_MIRROR} && tar -C DIR -c . | docker import - "
        f"{BASE_IMAGE}"
    )
    if shutil.which("debootstrap") is None:
        raise PrerequisiteMissingError(
            f"the base image {BASE_IMAGE} is missing and debootstrap is not installed; install "
            f"it (apt-get install debootstrap) or make the image once as root: {command_hint}"
        )
    if os.geteuid() != 0:
        raise PrerequisiteMissingError(
            f"the base image {BASE_IMAGE} is missing and debootstrap needs root; run the tests "
            f"as root once or make the image as root: {command_hint}"
        )
    mirror = debian_mirror()
    tarball.parent.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=tarball.parent))
    # mkdtemp makes the folder 0700, and it becomes the image's "/".
    rootfs.chmod(0o755)
    log_path = tarball.parent / "debootstrap.log"
    try:
        progress(f"debootstrap {DEBIAN_SUITE} from {mirror} into {rootfs} (about a minute)")
        _run_logged(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                DEBIAN_SUITE,
                str(rootfs),
                mirror,
            ],
            log_path,
            step="debootstrap",
        )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        partial = tarball.with_suffix(".tar.partial")
        _run_logged(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(partial), "."],
            log_path,
            step="tar of the root filesystem",
        )
        partial.rename(tarball)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def _run_logged(command: Sequence[str], log_path: Path, step: str) -> None:
    with log_path.open("a") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
    if completed.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-BUILD_LOG_TAIL_LINES:])
        raise ImageBuildError(
            f"{step} failed with exit code {completed.returncode} (log {log_path}); "
            f"log tail:\n{tail}"
        )


def inputs_digest(paths: Sequence[Path], root: Path = REPO_ROOT) -> str:
    """Hash files and folder trees by relative path and content; ``__pycache__`` is left out."""
    digest = hashlib.sha256()
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file())
        else:
            files.append(path)
    for path in sorted(files):
        if "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
        digest.update(b"\n")
    return digest.hexdigest()


def ensure_wheelhouse(
    wheelhouse: Path = WHEELHOUSE_DIR, root: Path = REPO_ROOT, progress: Progress = logger.info
) -> Path:
    """Download the wheels of ``requirements-train.txt`` with the host's pip; return the folder.

    The host's pip reaches the package index, and on a CPU machine the torch pin resolves to the
    CPU build. A stamp file records the requirements and constraints the folder was made for,
    so an unchanged pair skips pip.
    """
    requirements = root / TRAIN_REQUIREMENTS
    constraints = root / CONSTRAINTS
    expected = inputs_digest([requirements, constraints], root)
    stamp = wheelhouse / ".ml-loop-train.sha256"
    if stamp.is_file() and stamp.read_text().strip() == expected:
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    progress(f"downloading the wheels of {TRAIN_REQUIREMENTS} into {wheelhouse}")
    log_path = CACHE_DIR / "pip-download.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    _run_logged(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            "-r",
            str(requirements),
            "-c",
            str(constraints),
            "-d",
            str(wheelhouse),
        ],
        log_path,
        step="pip download",
    )
    stamp.write_text(expected + "\n")
    return wheelhouse


def train_image_tag(base_image_id: str, root: Path = REPO_ROOT) -> str:
    """Return the tag of the training image for the current inputs and base image.

    The tag hashes the inputs of the package layer (Dockerfile.train, requirements-train.txt,
    constraints.txt, .dockerignore) and of the code layer (include/ml_loop, include/specs).
    """
    packages = inputs_digest(
        [
            root / TRAIN_DOCKERFILE,
            root / TRAIN_REQUIREMENTS,
            root / CONSTRAINTS,
            root / ".dockerignore",
        ],
        root,
    )
    code = inputs_digest([root / "include" / "ml_loop", root / "include" / "specs"], root)
    combined = hashlib.sha256(f"{base_image_id}\n{packages}\n{code}".encode()).hexdigest()
    return f"{TRAIN_IMAGE_REPOSITORY}:{combined[:16]}"


def ensure_train_image(
    client: docker.DockerClient,
    root: Path = REPO_ROOT,
    cache_dir: Path = CACHE_DIR,
    progress: Progress = logger.info,
) -> str:
    """Build the training image for the tests, or reuse an up-to-date one; return its tag.

    Steps: the local base image, the host-side wheelhouse, then ``Dockerfile.train`` with
    ``--no-index --find-links`` and without pulling. After a successful build, only the newest
    tags of the test image are kept. Raises ImageBuildError with the tail of the build log on
    failure.
    """
    with build_lock(cache_dir):
        base = ensure_base_image(client, cache_dir, progress)
        tag = train_image_tag(client.images.get(base).id, root)
        if image_exists(client, tag):
            return tag
        wheelhouse = ensure_wheelhouse(root / WHEELHOUSE_DIR.relative_to(REPO_ROOT), root, progress)
        progress(f"building {tag} from {TRAIN_DOCKERFILE} (several minutes the first time)")
        _build_image(
            client,
            root,
            tag,
            buildargs={
                "BASE_IMAGE": base,
                "PIP_INSTALL_OPTIONS": f"--no-index --find-links {IMAGE_WHEELHOUSE}",
                "WHEELHOUSE": wheelhouse.relative_to(root).as_posix(),
            },
            log_path=cache_dir / "train-image-build.log",
            progress=progress,
        )
        _remove_old_tags(client)
        return tag


def _build_image(
    client: docker.DockerClient,
    root: Path,
    tag: str,
    buildargs: Mapping[str, str],
    log_path: Path,
    progress: Progress,
) -> None:
    tail: deque[str] = deque(maxlen=BUILD_LOG_TAIL_LINES)
    error = None
    with log_path.open("w") as log:
        try:
            stream = client.api.build(
                path=str(root),
                dockerfile=TRAIN_DOCKERFILE,
                tag=tag,
                buildargs=dict(buildargs),
                labels=TEST_LABEL,
                pull=False,
                network_mode="host",
                rm=True,
                forcerm=True,
                decode=True,
                # One build step can print nothing for minutes (pip installing torch).
                timeout=3600,
            )
            for chunk in stream:
                error = _record_build_chunk(chunk, log, tail, progress) or error
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            error = f"{type(err).__name__}: {err}"
    if error is not None:
        joined = "\n".join(tail)
        raise ImageBuildError(
            f"docker build of {TRAIN_DOCKERFILE} as {tag} failed: {error.strip()} (log "
            f"{log_path}); fix the Dockerfile or the requirements and rerun. Log tail:\n{joined}"
        )


def _record_build_chunk(
    chunk: dict[str, Any], log: Any, tail: deque[str], progress: Progress
) -> str | None:
    """Write one decoded build message to the log; return its error text, if it has one."""
    text = chunk.get("stream") or chunk.get("status") or ""
    for line in text.splitlines():
        log.write(line + "\n")
        tail.append(line)
        if line.startswith("Step "):
            progress(line)
    log.flush()
    if "error" in chunk:
        message = str(chunk["error"])
        log.write(message + "\n")
        tail.append(message)
        return message
    return None


def _remove_old_tags(client: docker.DockerClient, keep: int = KEPT_TRAIN_IMAGES) -> None:
    """Remove all but the ``keep`` newest tags of the test training image.

    A few tags stay, because another test session on the same engine may still run the image it
    built from another state of the tree. Tags that differ only in code share every other layer.
    """
    images = client.images.list(name=TRAIN_IMAGE_REPOSITORY, filters={"label": "ml-loop.test=1"})
    images.sort(key=lambda image: image.attrs["Created"], reverse=True)
    for image in images[keep:]:
        for stale in image.tags:
            logger.info("removing the outdated test image %s", stale)
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(stale)


def run_container(
    client: docker.DockerClient,
    image: str,
    command: Sequence[str],
    *,
    user: str | None = None,
    environment: Mapping[str, str] | None = None,
    volumes: Mapping[str, Mapping[str, str]] | None = None,
    timeout_s: float = 600,
) -> ContainerResult:
    """Run ``command`` in a new container with host networking and remove it afterwards.

    ``volumes`` takes the docker SDK form ``{host_path: {"bind": path, "mode": "rw"}}``. The
    container is created, never pulled, so a missing image raises ``docker.errors.ImageNotFound``.
    A container still running after ``timeout_s`` is killed and removed, and the
    ``requests.exceptions`` timeout propagates.
    """
    container = client.containers.create(
        image,
        list(command),
        user=user,
        environment=dict(environment or {}),
        volumes={key: dict(value) for key, value in (volumes or {}).items()},
        network_mode="host",
        labels=TEST_LABEL,
    )
    try:
        container.start()
        status = container.wait(timeout=timeout_s)
        stdout = container.logs(stdout=True, stderr=False).decode(errors="replace")
        stderr = container.logs(stdout=False, stderr=True).decode(errors="replace")
        return ContainerResult(int(status["StatusCode"]), stdout, stderr)
    finally:
        container.remove(force=True)
