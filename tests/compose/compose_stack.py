"""Helpers of the compose tests: local stand-in images and one docker-compose project.

Nothing can be pulled on the test machines, so every image of docker-compose.yaml is built here:
PostgreSQL and Redis from Debian's packages on the local base image of ``containers.py``
(Dockerfiles in ``tests/compose/images``), and the project image from ``Dockerfile`` on that
base. The project image installs its packages from a host-side wheelhouse, which an HTTP server
on 127.0.0.1 serves to the build (``docker build --network host``), so the wheels
never become a layer. Every image and container carries the label ``ml-loop.test=1``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import docker
import docker.errors

import containers

logger = logging.getLogger(__name__)

REPO_ROOT = containers.REPO_ROOT
COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
INIT_ENV_SCRIPT = REPO_ROOT / "include" / "compose" / "init-env.py"
COMPOSE_REQUIREMENTS = REPO_ROOT / "include" / "compose" / "requirements.txt"
STAND_IN_DIR = Path(__file__).resolve().parent / "images"
# Outside the build context (.dockerignore leaves out .cache), because the build reads the wheels
# over HTTP and a context of several hundred MB would slow down every build.
PROJECT_WHEELHOUSE = REPO_ROOT / ".cache" / "wheelhouse-project"
IMAGE_PREFIX = "ml-loop-test/compose-"
LABEL_FILTER = "ml-loop.test=1"
BUILD_TIMEOUT_S = 3600.0
COMPOSE_TIMEOUT_S = 900.0
LOG_TAIL_CHARS = 6000


class ComposeError(RuntimeError):
    """A docker-compose or docker build command failed; the message ends with its output."""


def _run(
    command: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 600.0
) -> str:
    started = time.monotonic()
    result = subprocess.run(
        list(command),
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        cwd=REPO_ROOT,
    )
    logger.info("%s took %.1f s", " ".join(command[:6]), time.monotonic() - started)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:]
        raise ComposeError(
            f"`{' '.join(command)}` failed with exit code {result.returncode}; output ends "
            f"with:\n{output}"
        )
    return result.stdout


def image_tag(name: str, inputs: Sequence[Path], base_id: str) -> str:
    """Return ``ml-loop-test/compose-<name>:<hash>`` for a base image and the build inputs."""
    digest = containers.inputs_digest(list(inputs))
    return f"{IMAGE_PREFIX}{name}:{(base_id.split(':')[-1][:12] + digest)[:24]}"


def docker_build(
    context: Path,
    tag: str,
    build_args: Mapping[str, str],
    log_path: Path,
    dockerfile: str = "Dockerfile",
) -> None:
    """Build ``tag`` with the docker CLI, with the host network and never pulling."""
    command = ["docker", "build", "--network", "host", "--label", LABEL_FILTER, "-t", tag]
    command += ["-f", str(context / dockerfile)]
    for name, value in build_args.items():
        command += ["--build-arg", f"{name}={value}"]
    command.append(str(context))
    with log_path.open("w") as log:
        result = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S, check=False
        )
    if result.returncode != 0:
        tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        raise ComposeError(f"docker build of {tag} failed (log {log_path}); log tail:\n{tail}")


def ensure_wheelhouse(progress: containers.Progress) -> Path:
    """Download the project image's wheels into PROJECT_WHEELHOUSE; return the folder.

    pip download resolves markers for the host's Python. Debian bookworm's Python 3.11.2 also
    needs the marker-only pins of include/compose/requirements.txt (async-timeout below 3.11.3),
    so those are downloaded once more without their markers.
    """
    wheelhouse = PROJECT_WHEELHOUSE
    wanted = containers.inputs_digest(
        [REPO_ROOT / "requirements.txt", COMPOSE_REQUIREMENTS, REPO_ROOT / "constraints.txt"]
    )
    stamp = wheelhouse / ".ml-loop-compose.sha256"
    if stamp.is_file() and stamp.read_text().strip() == wanted:
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    progress(f"downloading the wheels of the project image into {wheelhouse}")
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:"]
    _run(
        [
            *pip,
            "-d",
            str(wheelhouse),
            "apache-airflow==3.3.2",
            "-r",
            str(REPO_ROOT / "requirements.txt"),
            "-r",
            str(COMPOSE_REQUIREMENTS),
            "-c",
            str(REPO_ROOT / "constraints.txt"),
        ],
        timeout_s=1800,
    )
    marker_pins = [
        line.split(";")[0].strip()
        for line in COMPOSE_REQUIREMENTS.read_text().splitlines()
        if ";" in line and not line.lstrip().startswith("#")
    ]
    if marker_pins:
        _run([*pip, "--no-deps", "-d", str(wheelhouse), *marker_pins])
    stamp.write_text(wanted + "\n")
    return wheelhouse


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on a free port of 127.0.0.1; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        logger.debug(format, *args)


def build_images(
    client: docker.DockerClient, work_dir: Path, progress: containers.Progress
) -> dict[str, str]:
    """Build the stand-ins and the project image unless they exist; return the image variables.

    The keys are the variables of docker-compose.yaml that name the images.
    """
    with containers.build_lock():
        base = containers.ensure_base_image(client, progress=progress)
        base_id = client.images.get(base).id
        images: dict[str, str] = {}
        for name, variable in (
            ("postgres", "ML_LOOP_POSTGRES_IMAGE"),
            ("redis", "ML_LOOP_REDIS_IMAGE"),
        ):
            context = STAND_IN_DIR / name
            tag = image_tag(name, [context], base_id)
            if not containers.image_exists(client, tag):
                progress(f"building {tag}")
                docker_build(context, tag, {"BASE_IMAGE": base}, work_dir / f"build-{name}.log")
            images[variable] = tag
        project_inputs = [
            REPO_ROOT / "Dockerfile",
            REPO_ROOT / "requirements.txt",
            REPO_ROOT / "constraints.txt",
            COMPOSE_REQUIREMENTS,
            REPO_ROOT / "include",
            REPO_ROOT / "plugins",
            REPO_ROOT / "dags",
        ]
        tag = image_tag("project", project_inputs, base_id)
        if not containers.image_exists(client, tag):
            wheelhouse = ensure_wheelhouse(progress)
            progress(f"building {tag} from Dockerfile (several minutes the first time)")
            with serve_folder(wheelhouse) as url:
                options = f"--no-index --find-links {url} --trusted-host 127.0.0.1"
                docker_build(
                    REPO_ROOT,
                    tag,
                    {"BASE_IMAGE": base, "PIP_INSTALL_OPTIONS": options},
                    work_dir / "build-project.log",
                )
        images["ML_LOOP_IMAGE"] = tag
        return images


def remove_images(tags: Sequence[str]) -> None:
    """Remove the images with the docker CLI; a failure is logged and the others still go.

    The CLI has no read timeout, unlike the SDK client, and removing a 2 GB image can take longer
    than the SDK's default on a busy machine.
    """
    for tag in tags:
        result = subprocess.run(
            ["docker", "rmi", "--force", tag], capture_output=True, text=True, check=False
        )
        if result.returncode != 0 and "No such image" not in result.stderr:
            logger.warning("could not remove image %s: %s", tag, result.stderr.strip())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_env_file(path: Path) -> dict[str, str]:
    """Parse ``NAME=value`` lines; comments and blank lines are skipped."""
    values = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            values[match.group(1)] = match.group(2)
    return values


class ComposeProject:
    """One docker-compose project of docker-compose.yaml with its own name and env file."""

    def __init__(self, name: str, env_file: Path, environ: Mapping[str, str]) -> None:
        self.name = name
        self.env_file = env_file
        # The file names the data volume and the network after the project.
        self.environ = {**os.environ, **environ, "COMPOSE_PROJECT_NAME": name}

    def command(self, *args: str, timeout_s: float = COMPOSE_TIMEOUT_S) -> str:
        return _run(
            [
                "docker-compose",
                "--file",
                str(COMPOSE_FILE),
                "--project-name",
                self.name,
                "--env-file",
                str(self.env_file),
                *args,
            ],
            env=self.environ,
            timeout_s=timeout_s,
        )

    def with_environ(self, **overrides: str) -> ComposeProject:
        """Return the same project with more variables in its environment."""
        return ComposeProject(self.name, self.env_file, {**self.environ, **overrides})

    def containers(self, client: docker.DockerClient) -> list[docker.models.containers.Container]:
        return client.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={self.name}"}
        )

    def service_containers(
        self, client: docker.DockerClient, service: str
    ) -> list[docker.models.containers.Container]:
        return [
            container
            for container in self.containers(client)
            if container.labels.get("com.docker.compose.service") == service
        ]

    def wait_healthy(self, client: docker.DockerClient, timeout_s: float = 600.0) -> list[str]:
        """Wait until every running container of the project is healthy; return the services.

        One-shot containers (airflow-init, ``run`` containers) are left out. Raises ComposeError
        with the states and the log tail of an unhealthy or exited container.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            states = {}
            for container in self.containers(client):
                container.reload()
                service = container.labels.get("com.docker.compose.service", "")
                if container.labels.get("com.docker.compose.oneoff") == "True":
                    continue
                if service == "airflow-init":
                    continue
                state = container.attrs["State"]
                states[container.name] = (
                    state["Health"]["Status"] if "Health" in state else state["Status"]
                )
                if state["Status"] == "exited" or states[container.name] == "unhealthy":
                    raise ComposeError(
                        f"container {container.name} is {states[container.name]}; its log ends "
                        f"with:\n{self.log_tail(client, container.name)}"
                    )
            if states and all(status == "healthy" for status in states.values()):
                return sorted(
                    container.labels["com.docker.compose.service"]
                    for container in self.containers(client)
                    if container.name in states
                )
            if time.monotonic() > deadline:
                raise ComposeError(
                    f"not every container became healthy in {timeout_s:.0f} s: {states}"
                )
            time.sleep(3)

    def log_tail(self, client: docker.DockerClient, container_name: str) -> str:
        try:
            logs = client.containers.get(container_name).logs(tail=60)
        except docker.errors.NotFound:
            return "(container removed)"
        return logs.decode(errors="replace")[-LOG_TAIL_CHARS:]

    def down(self, volumes: bool) -> None:
        args = ["down", "--remove-orphans", "--timeout", "30"]
        if volumes:
            args.append("--volumes")
        # Every profile, so the containers of celery and cli are removed too.
        self.with_environ(COMPOSE_PROFILES="celery,cli").command(*args)
