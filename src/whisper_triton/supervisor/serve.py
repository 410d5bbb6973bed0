"""`serve`: the container entrypoint. Starts tritonserver on 127.0.0.1, waits for the model, then
serves the SageMaker contract; ends both on SIGTERM, and exits non-zero if Triton dies."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path

from ..contract.realtime import MAX_EVENT_BYTES
from ..contract.tensors import MODELS, WHISPER_WINDOW
from ..registry.registry import RegistryConfig
from .model_source import cache_dir, model_parameters, model_repository, render_repository
from ..settings import Settings, load_settings, resolve_settings
from .triton_server import TritonPorts, TritonServer, TritonStartError

logger = logging.getLogger("whisper_triton.supervisor.serve")
H11_MAX_INCOMPLETE_EVENT_BYTES = 16 * 1024  # headers + request line (the 16 KiB query limit's room)
KEEP_ALIVE_S = 5


def default_model_repository() -> Path:
    """The repository shipped with the project: `WHISPER_TRITON_MODEL_REPOSITORY`, else
    `./model_repo_whisper_trtllm` in the working directory (the project root, and /app in the image)."""
    return Path.cwd() / "model_repo_whisper_trtllm"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="serve",
        description="Start Triton with the Whisper model repository and the SageMaker HTTP contract "
        "(GET /ping, POST /invocations). Every option also has a WHISPER_TRITON_* environment variable.",
    )
    # SageMaker runs `docker run IMAGE serve`, which hands the word "serve" to the entrypoint
    parser.add_argument("command", nargs="?", choices=["serve"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help="Whisper model directory (default: the embedded tiny.en)")
    parser.add_argument("--engine", choices=["ctranslate2", "tensorrtllm"])
    parser.add_argument("--port", type=int, help="HTTP port of the SageMaker contract (default 8080)")
    return parser.parse_args(argv)


def cli_overrides(args: argparse.Namespace) -> dict:
    return {"model_dir": args.model_dir, "engine": args.engine, "port": args.port}


def maybe_start_ssh(settings: Settings) -> bool:
    """Start sagemaker-ssh-helper when START_SSH asks for it; never fail serving because of it."""
    if not settings.start_ssh:
        return False
    try:
        import sagemaker_ssh_helper

        sagemaker_ssh_helper.setup_and_start_ssh()
    except ImportError:
        logger.warning("START_SSH is set but sagemaker-ssh-helper is not installed (build the image with "
                       "--build-arg INSTALL_SSH_HELPER=true): serving without SSH")
        return False
    except Exception as exc:  # noqa: BLE001 - SSH is a debugging aid; serving goes on without it
        logger.warning("START_SSH is set but sagemaker-ssh-helper failed (%s): serving without SSH", exc)
        return False
    logger.info("sagemaker-ssh-helper started")
    return True


class Supervisor:
    def __init__(self, settings: Settings, cli: dict | None = None):
        self.settings = settings
        self.cli = cli or {}
        self.exit_code = 0
        self.stopping = threading.Event()
        self.triton: TritonServer | None = None
        self.http = None
        self.registry_config: RegistryConfig | None = None

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        maybe_start_ssh(self.settings)
        try:
            self._start_triton()
            if not self.stopping.is_set():
                self._serve_http()
        except TritonStartError as exc:
            logger.error("%s", exc)
            self.exit_code = 1
        finally:
            self._stop_triton()
        return self.exit_code

    def _on_signal(self, signum, frame) -> None:
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        self.stopping.set()
        if self.http is not None:
            self.http.should_exit = True
        elif self.triton is not None:
            raise KeyboardInterrupt  # interrupts the readiness wait

    def _start_triton(self) -> None:
        settings = self.settings
        repository = model_repository(settings, default_model_repository())  # S3, /opt/ml/model or the setting
        if not (repository / "whisper" / "config.pbtxt").is_file():
            raise TritonStartError(
                f"{repository} is not a Whisper model repository (no whisper/config.pbtxt). Set "
                "WHISPER_TRITON_MODEL_REPOSITORY to the repository directory."
            )
        workdir = Path(tempfile.mkdtemp(prefix="whisper-triton-"))
        ports = TritonPorts(settings.triton_http_port, settings.triton_grpc_port, settings.triton_metrics_port)
        if self.stopping.is_set():  # SIGTERM while the repository was being fetched
            return
        # command line > the repository's own parameters > environment, rendered for the models to read
        engine_config = repository / WHISPER_WINDOW / "config.pbtxt"
        parameters = model_parameters(engine_config) if engine_config.is_file() else {}
        resolved = resolve_settings(cli=self.cli, model_parameters=parameters)
        self.registry_config = registry_config(settings, resolved, repository)  # the manifest checked here
        resolved.served_model_name = self.registry_config.default_id  # transcribe knows the default by it
        rendered = render_repository(repository.resolve(), workdir / "repository", resolved)
        self.registry_config.repository = rendered
        # explicit model control: the default's models load now, every other model's engine model when
        # a request first names it (the registry, through Triton's repository API on loopback)
        control = ["--model-control-mode=explicit", *(f"--load-model={name}" for name in MODELS)]
        self.triton = TritonServer(rendered, workdir, ports, settings.triton_home, settings.triton_log_verbose,
                                   extra_args=control)
        # the registry alone may use Triton's repository API: it gets this start's key
        self.registry_config.triton_headers = self.triton.control_headers()
        self.triton.start()
        try:
            self.triton.wait_ready(list(MODELS), settings.triton_startup_timeout_s)
        except KeyboardInterrupt:
            logger.info("stopped before Triton was ready")

    def _serve_http(self) -> None:
        import uvicorn

        from ..http.app import create_app

        from ..registry import ModelRegistry

        registry = ModelRegistry(self.registry_config) if self.registry_config is not None else None
        app = create_app(self.settings, registry=registry)
        # log_config=None: uvicorn's lines go through serve's handlers, with the request id
        config = uvicorn.Config(app, host=self.settings.bind_host, port=self.settings.port, log_config=None,
                                log_level="info", access_log=False, timeout_graceful_shutdown=10,
                                # a little over the live events' own limit, so an event just over it gets
                                # an `error` event saying why before the close (1009); larger ones uvicorn cuts
                                ws_max_size=MAX_EVENT_BYTES + 64 * 1024,
                                # uvicorn's own limits, explicit: h11 refuses headers (and a request
                                # line) past 16 KiB; an idle keep-alive connection closes after 5 s;
                                # beyond max_connections connections and requests uvicorn answers 503
                                # itself (far above admission's bound, so it only stops a connection flood)
                                h11_max_incomplete_event_size=H11_MAX_INCOMPLETE_EVENT_BYTES,
                                timeout_keep_alive=KEEP_ALIVE_S,
                                limit_concurrency=self.settings.max_connections)
        self.http = uvicorn.Server(config)
        watcher = threading.Thread(target=self._watch_triton, name="triton-watch", daemon=True)
        watcher.start()
        logger.info("SageMaker contract on http://%s:%d (GET /ping, POST /invocations)",
                    self.settings.bind_host, self.settings.port)
        self.http.run()
        if self.http.started is False and not self.stopping.is_set() and self.exit_code == 0:
            logger.error("the HTTP server could not start (is port %d in use?)", self.settings.port)
            self.exit_code = 1

    def _watch_triton(self) -> None:
        """Triton or one of its Python-backend stubs gone: end serve non-zero, so the platform
        restarts the container. A dead stub is not restarted by Triton in time: requests routed to
        it would hang until their deadline, so failing fast is the honest answer."""
        stubs = self.triton.stub_processes() if self.triton is not None else {}
        while not self.stopping.wait(0.5):
            if self.triton is None:
                continue
            if not self.triton.is_running():
                self._fail("tritonserver exited unexpectedly (code %s): stopping serve",
                           self.triton.process.returncode if self.triton.process else None)
                return
            dead = {pid: model for pid, model in stubs.items() if not _alive(pid)}
            if dead:
                self._fail("the Python-backend stub of model %s died: stopping serve (non-zero) so the "
                           "platform restarts it", ", ".join(sorted(set(dead.values()))))
                return

    def _fail(self, message: str, *args) -> None:
        logger.error(message, *args)
        self.exit_code = 1
        self.stopping.set()
        if self.triton is not None:
            # Triton first: requests in flight then fail at once (503 JSON) instead of hanging
            self.triton.stop(timeout_s=5)
        if self.http is not None:
            self.http.should_exit = True

    def _stop_triton(self) -> None:
        self.stopping.set()
        if self.triton is not None:
            code = self.triton.stop()
            logger.info("tritonserver stopped (code %s)", code)


def registry_config(settings: Settings, resolved: Settings, repository: Path) -> RegistryConfig:
    """The registry's part of the settings, with the default's id decided and the manifest checked
    (a broken manifest stops serve here, with its cause, before Triton starts)."""
    from ..registry.catalog import manifest_path, manifest_records, model_id_from_dir

    aliases = tuple(a.strip() for a in settings.model_aliases.split(",") if a.strip())
    manifest = manifest_path(settings.model_manifest, repository)
    chosen_id = resolved.served_model_name or settings.served_model_name
    if manifest is not None:
        try:
            records, manifest_default = manifest_records(manifest)
        except ValueError as exc:
            raise TritonStartError(f"The model manifest cannot be served: {exc}") from None
        default = next(record for record in records if record.id == manifest_default)
        if not resolved.model_dir and default.model_dir is not None:
            # no model given otherwise: the manifest's default is serve's default (whisper_window runs it)
            resolved.model_dir = str(default.model_dir)
            chosen_id = chosen_id or default.id
            aliases = tuple(dict.fromkeys((*aliases, *default.aliases)))
    model_dir = str(resolved.resolved_model_dir())
    default_id = chosen_id or model_id_from_dir(resolved.model_dir)
    roots = tuple(Path(root.strip()).resolve() for root in settings.model_load_roots.split(",") if root.strip())
    return RegistryConfig(default_id=default_id, default_model_dir=model_dir, default_engine=resolved.engine,
                          default_aliases=aliases, manifest=manifest, memory_budget_mb=settings.model_memory_budget_mb,
                          load_wait_s=settings.model_load_wait_s, load_timeout_s=settings.model_load_timeout_s,
                          load_roots=roots, cache_dir=cache_dir(settings), retry_after_s=settings.retry_after_s,
                          triton_url=f"127.0.0.1:{settings.triton_grpc_port}")


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie is dead


def main(argv: list[str] | None = None) -> int:
    from ..http.guards import install_request_id_logging

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    install_request_id_logging()  # every line says which request it belongs to ("-": none)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cli = cli_overrides(args)
    return Supervisor(load_settings(**cli), cli).run()


if __name__ == "__main__":
    sys.exit(main())
