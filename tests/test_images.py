"""The images are reproducible and hold what they run: checks that need no image builder.

- The lock files (``locks/*.lock``, `make locks`) pin every package with ``==`` and hashes,
  as ``pip install --require-hashes`` demands, and agree with pyproject.toml: each declared
  dependency of the image's extra is locked at a version its specifier admits (for the
  images' CPython 3.11 on x86_64 Linux), and what the lock says came from pyproject.toml
  is exactly what pyproject.toml declares, so a lock left behind by a change fails here.
- Every third-party module the runtime imports is in the locks: at module level along
  each function's start-up path, in that function's lock; anywhere, in the writer's.
- The Dockerfiles install from their lock only, build the project without fetching, and
  keep pip out of the runtime venv.
- The launcher turns gunicorn's control socket off, and a served function started as the
  images' user (HOME=/nonexistent) logs no control-server error.

Building and running the images is `make image-check` (scripts/image-check.sh, podman);
docs/IMAGES.md describes both.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from hisparc_datastore import serve

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "locks"
SRC = ROOT / "src"
FUNCTIONS = ("upload", "writer")
PROJECT = "hisparc-datastore"
#: The images' interpreter and platform, for the markers of declared dependencies.
TARGET = {
    "python_version": "3.11", "python_full_version": "3.11.14", "os_name": "posix",
    "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
    "platform_python_implementation": "CPython", "implementation_name": "cpython",
    "implementation_version": "3.11.14", "platform_release": "", "platform_version": "",
}
#: Imported by the runtime but deliberately not in the images: creating a bucket
#: (``Bucket.ensure_exists``) is for the local stack and tests, and says so without boto3.
NOT_IN_IMAGES = {"boto3", "botocore"}
_PIN = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[0-9][^\s;\\]*)"
    r"(?P<hashes>(?:\s+--hash=sha256:[0-9a-f]{64})+)\s*"
)


@dataclass
class Pin:
    name: str
    version: str
    hashes: list[str]
    via: set[str] = field(default_factory=set)


def parse_lock(path: Path) -> dict[str, Pin]:
    """The lock's pins by canonical name; fails on any line pip would not take as pinned."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for number, line in enumerate(re.sub(r"\\\n", " ", path.read_text()).splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            if current is not None and line.startswith(" "):
                words = stripped.lstrip("#").strip()
                words = words.removeprefix("via").strip()
                if words:
                    current.via.add(words)
            continue
        match = _PIN.fullmatch(stripped)
        assert match, f"{path.name}, entry {number}: not `name==version --hash=...`: {line!r}"
        name = canonicalize_name(match["name"])
        assert name not in pins, f"{path.name}: {name} twice"
        current = pins[name] = Pin(name, match["version"],
                                   re.findall(r"sha256:([0-9a-f]{64})", match["hashes"]))
    return pins


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def declared(extra: str) -> list[Requirement]:
    """The main dependencies and those of ``extra``, for the images' platform."""
    project = pyproject()["project"]
    requirements: list[Requirement] = []
    pending = [*project["dependencies"], *project["optional-dependencies"][extra]]
    while pending:
        requirement = Requirement(pending.pop(0))
        if canonicalize_name(requirement.name) == PROJECT:  # an extra naming others
            for other in requirement.extras:
                pending += project["optional-dependencies"][other]
            continue
        if requirement.marker is None or requirement.marker.evaluate({**TARGET, "extra": ""}):
            requirements.append(requirement)
    return requirements


def lock_path(name: str) -> Path:
    return LOCKS / f"{name}.lock"


# --- the locks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*FUNCTIONS, "build"])
def test_every_lock_entry_is_pinned_with_hashes(name: str) -> None:
    path = lock_path(name)
    assert path.is_file(), f"{path} is missing: run `make locks`"
    header = path.read_text().splitlines()[:3]
    assert any("make locks" in line for line in header), "generated by `make locks`"
    pins = parse_lock(path)
    assert pins
    for pin in pins.values():
        assert pin.hashes, f"{pin.name}: no hash"
        Version(pin.version)  # a version, not a range


@pytest.mark.parametrize("name", FUNCTIONS)
def test_lock_agrees_with_the_extra_of_pyproject(name: str) -> None:
    pins = parse_lock(lock_path(name))
    requirements = declared(name)
    for requirement in requirements:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement} is not in {name}.lock: run `make locks`"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{name}.lock has {pin.name}=={pin.version}, pyproject.toml wants {requirement}: "
            "run `make locks`")
    # What the lock says pyproject.toml asked for is what pyproject.toml asks for now.
    from_pyproject = {pin.name for pin in pins.values()
                      if any(f"{PROJECT} (pyproject.toml)" in via for via in pin.via)}
    assert from_pyproject == {canonicalize_name(r.name) for r in requirements}, (
        f"{name}.lock was made from other dependencies: run `make locks`")
    assert PROJECT not in pins
    assert not {"pip", "setuptools", "wheel"} & set(pins), "build tools belong to build.lock"


@pytest.mark.parametrize("name", FUNCTIONS)
def test_gunicorn_is_locked_for_the_launcher(name: str) -> None:
    """serve.py subclasses gunicorn's internals, so its version must not float; today it
    comes through functions-framework."""
    pins = parse_lock(lock_path(name))
    assert "gunicorn" in pins and "functions-framework" in pins
    assert Version(pins["gunicorn"].version) >= Version("22")


def test_build_lock_holds_pip_and_the_build_backend() -> None:
    pins = parse_lock(lock_path("build"))
    requires = [Requirement(text) for text in pyproject()["build-system"]["requires"]]
    for requirement in [*requires, Requirement("pip")]:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None and requirement.specifier.contains(pin.version), requirement
    # `pip --python` (the Dockerfiles install into a venv without pip) needs pip >= 22.3.
    assert Version(pins["pip"].version) >= Version("22.3")


# --- the runtime's imports -----------------------------------------------------------------


def _module_file(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str, module_level: bool) -> set[str]:
    """Absolute names imported by ``path``; with ``module_level``, only what runs at import
    (not function bodies, not ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if (module_level and isinstance(child, ast.If)
                    and "TYPE_CHECKING" in ast.unparse(child.test)):
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parent = ".".join(parts[: len(parts) - child.level + 1])
                    base = f"{parent}.{base}" if base else parent
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in child.names
                             if _module_file(f"{base}.{alias.name}"))
            visit(child)

    visit(tree)
    return names


def third_party_imports(entries: list[Path], module_level: bool,
                        skip: frozenset[Path] = frozenset()) -> set[str]:
    """Top-level third-party modules imported from ``entries``, following the project's
    own modules (and the packages above each) but those in ``skip``."""
    seen: set[str] = set()
    found: set[str] = set()
    pending = [(path, "__main__") for path in entries]
    while pending:
        path, module = pending.pop()
        for name in _imports(path, module, module_level):
            top = name.split(".")[0]
            if top == "hisparc_datastore":
                parts = name.split(".")
                for depth in range(1, len(parts) + 1):
                    inner = ".".join(parts[:depth])
                    file = _module_file(inner)
                    if file and inner not in seen and Path(file) not in skip:
                        seen.add(inner)
                        pending.append((file, inner))
            elif top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def distributions_of(modules: set[str]) -> set[str]:
    mapping = importlib.metadata.packages_distributions()
    missing = {module for module in modules if module not in mapping}
    assert not missing, f"no installed distribution provides {missing}"
    return {canonicalize_name(mapping[module][0]) for module in modules}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_what_a_function_imports_at_start_up_is_in_its_lock(name: str) -> None:
    entries = [ROOT / "functions" / name / "main.py", SRC / "hisparc_datastore" / "serve.py"]
    if name == "upload":  # its async worker, which the launcher imports when it starts one
        entries.append(SRC / "hisparc_datastore" / "serve_async.py")
    modules = third_party_imports(entries, module_level=True)
    assert {"functions_framework", "gunicorn"} <= modules
    locked = set(parse_lock(lock_path(name)))
    assert distributions_of(modules) - locked == set(), f"{name}.lock misses an import"
    if name == "upload":
        assert "h5py" not in modules, "the upload function would need h5py at start-up"
        assert {"uvicorn", "uvicorn_worker", "httptools"} <= modules
        assert "uvloop" in locked, "uvicorn imports it by name (loop='uvloop')"


#: Runtime modules only the upload's image runs: the async worker (uvloop, httptools), which
#: the launcher imports only for a function with an ASGI application, and the writer has none.
UPLOAD_ONLY = frozenset({SRC / "hisparc_datastore" / "serve_async.py"})


def test_everything_the_runtime_imports_is_in_the_writer_lock() -> None:
    entries = [*sorted(set((SRC / "hisparc_datastore").rglob("*.py")) - UPLOAD_ONLY),
               *(ROOT / "functions" / name / "main.py" for name in FUNCTIONS)]
    modules = third_party_imports(entries, module_level=False, skip=UPLOAD_ONLY) - NOT_IN_IMAGES
    locked = set(parse_lock(lock_path("writer")))
    assert distributions_of(modules) - locked == set()


# --- the Dockerfiles -----------------------------------------------------------------------


def _instructions(name: str) -> str:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "functions" / name / "Dockerfile").read_text().splitlines()
             if not line.lstrip().startswith("#")]
    return re.sub(r"\\\n\s*", " ", "\n".join(lines))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_dockerfile_installs_from_the_lock_and_keeps_pip_out(name: str) -> None:
    text = _instructions(name)
    comments = (ROOT / "functions" / name / "Dockerfile").read_text()
    assert "make locks" in comments, "the Dockerfile says how its lock is refreshed"
    assert f"COPY locks/build.lock locks/{name}.lock locks/" in text
    assert "/opt/build/bin/pip install --no-cache-dir --require-hashes --no-deps " \
           "-r locks/build.lock" in text
    assert "python3 -m venv --without-pip /opt/venv" in text
    assert f"--require-hashes --no-deps --only-binary :all: -r locks/{name}.lock" in text
    # The project: built with the pinned backend, nothing fetched, installed alone.
    assert "pip wheel --no-cache-dir --no-deps --no-build-isolation" in text
    assert "--no-deps --no-index /tmp/wheels/hisparc_datastore-" in text
    assert "pip --python /opt/venv/bin/python check" in text
    # python3, not python: the official image has both, a Debian base only python3 (the
    # runtime's CMD runs the venv's python, which every venv has).
    assert not re.search(r"(^|[\s&;])python -m venv", text)
    assert "COPY --from=build /opt/venv /opt/venv" in text
    assert "/opt/build" not in text.split("COPY --from=build", 1)[1]


def test_build_context_keeps_the_locks_and_leaves_the_dev_tools_out() -> None:
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert not {"locks", "locks/", "locks/*"} & patterns
    assert {"dev", "scripts"} <= patterns


def test_make_has_the_lock_and_image_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in ("locks", "locks-upgrade", "image-check"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "uv==$(UV_VERSION)" in makefile


def test_image_scripts_pass_shellcheck_and_ruff() -> None:
    scripts = sorted(str(path) for path in (ROOT / "scripts").glob("*.sh"))
    assert any(path.endswith("image-check.sh") for path in scripts)
    for tool, arguments in (("shellcheck", scripts),
                            ("ruff", ["check", "--no-cache", str(ROOT / "scripts")])):
        candidate = Path(sys.executable).with_name(tool)
        executable = str(candidate) if candidate.exists() else shutil.which(tool)
        if executable is None:
            pytest.skip(f"{tool} is not installed (the dev extra has it)")
        result = subprocess.run([executable, *arguments], capture_output=True, text=True,
                                timeout=120, cwd=ROOT)
        assert result.returncode == 0, result.stdout + result.stderr


# --- gunicorn's control socket ---------------------------------------------------------


def _app(environ: dict, start_response: object) -> list[bytes]:
    return [b""]


def test_the_launcher_turns_gunicorns_control_socket_off() -> None:
    settings = {"bind": "127.0.0.1:0", "control_socket_disable": True}
    application = serve.FunctionApplication(_app, settings)
    if "control_socket_disable" not in application.cfg.settings:
        pytest.skip("this gunicorn (before 25.1) has no control socket")
    assert application.cfg.control_socket_disable is True


def test_an_older_gunicorn_without_the_setting_is_not_given_it() -> None:
    class OlderGunicorn(serve.FunctionApplication):
        def load_default_config(self) -> None:
            super().load_default_config()
            for key in serve.NEWER_GUNICORN_SETTINGS:
                self.cfg.settings.pop(key, None)

    application = OlderGunicorn(_app, {"bind": "127.0.0.1:0", "control_socket_disable": True})
    assert "control_socket_disable" not in application.cfg.settings
    assert application.cfg.bind == ["127.0.0.1:0"]


def test_served_as_the_images_user_home_no_control_server_error(tmp_path: Path) -> None:
    """A HOME that does not exist, as in the images (/nonexistent): gunicorn 25.1+ logged
    an error on every start there (here a path under tmp_path, which root could create)."""
    from hisparc_datastore_dev.processes import serve_function

    stations = tmp_path / "stations.csv"
    stations.write_text("501,Amsterdam,secret\n")
    config = tmp_path / "config.ini"
    config.write_text(textwrap.dedent(f"""\
        [General]
        log =
        loglevel = info
        station_list = {stations}
        data_dir = {tmp_path / "data"}
        minimum_year = 2020

        [Bucket]
        endpoint = http://127.0.0.1:9
        name = never-reached

        [Upload]
        max_body_bytes = 1048576
        """))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DATASTORE_", "AWS_", "XDG_"))}
    env.update(DATASTORE_CONFIG=str(config), AWS_ACCESS_KEY_ID="unused",
               AWS_SECRET_ACCESS_KEY="unused", HOME=str(tmp_path / "nonexistent"),
               TMPDIR=str(tmp_path),
               WORKERS="1", THREADS="2", GUNICORN_LOG_LEVEL="debug", METRICS_PORT="0")
    served = serve_function(ROOT / "functions" / "upload" / "main.py", "upload", env,
                            tmp_path / "upload.log", cwd=ROOT)
    served.stop()
    log = served.log()
    assert "Booting worker" in log, log
    assert "Control server error" not in log and "Failed to start control" not in log, log
    assert "[ERROR]" not in log and "Traceback" not in log, log
    import gunicorn.config

    if "control_socket_disable" in gunicorn.config.Config().settings:
        assert "Control socket disabled" in log, log  # gunicorn's debug line
