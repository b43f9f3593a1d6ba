"""Every server knob in one frozen object: defaults, then ``VQDIFF_*`` environment variables, then flags.

One name per setting: the field ``x_y`` is the flag ``--x-y`` and the variable ``VQDIFF_X_Y``. The flags of ``vqdiff serve`` are generated from the fields (``add_flags``), with the
help text of each field's ``help`` metadata, so a new field is a flag and a variable at once. A
``VQDIFF_*`` variable that is neither a setting nor in ``OTHER_VARIABLES`` is refused at start-up, with
the closest valid name: a misspelt setting must not silently keep its default. Bad values fail at
start-up naming the variable or the flag and the value, never at the first request.

Why not pydantic-settings: tried, and for this object it is worse. Its ``BaseSettings`` reads
``os.environ`` on every construction (the engine's and the tests' ``Settings(...)`` would depend on
the caller's environment), matches variable names case-insensitively (a second spelling of every
name; case-sensitive matching wants ``VQDIFF_max_rows``), ignores unknown prefixed variables (the
check below is needed anyway), JSON-decodes ``VQDIFF_API_KEYS`` unless the field is annotated
otherwise, reports a bad flag as a multi-line validation error naming the field rather than the flag
or variable, and is not a dataclass (``dataclasses.replace`` stops working). What it would replace
is the loop in ``from_env`` and ``_parse``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from vqdiff.model.sampling.params import COMPILE_MODES

ENV_PREFIX = "VQDIFF_"
ROLES = ("single", "worker", "api")

# VQDIFF_* variables that belong to the project but are not server settings; anything else with the
# prefix is refused at start-up.
OTHER_VARIABLES = {
    "VQDIFF_KERNELS": "the sampling-step kernels, auto | triton | torch (model/sampling/step.py)",
    "VQDIFF_PIP_ARGS": "extra pip arguments for the image build (docker-compose.yml)",
    "VQDIFF_EXTRAS": "the package extras the image installs (docker-compose.yml)",
    "VQDIFF_TORCH_INDEX": "the package index torch comes from in the image build (docker-compose.yml)",
    "VQDIFF_DEFAULT_MODEL": "the api service's default model name (docker-compose.yml: its VQDIFF_MODEL)",
    "VQDIFF_WORKERS": "how many worker replicas docker-compose.yml starts",
    "VQDIFF_REDIS_IMAGE": "the redis service's image (docker-compose.yml)",
    "VQDIFF_PROMETHEUS_IMAGE": "the prometheus service's image (docker-compose.yml)",
    "VQDIFF_GRAFANA_IMAGE": "the grafana service's image (docker-compose.yml)",
}


def _s(default, help: str):
    """A settings field: its default and its help text (the flag's help and the README's meaning)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    model: Path | None = _s(None, "model folder (diffusers layout); none: the embedded default model. API role: "
                                  "the name of the published model that requests naming none get")
    host: str = _s("0.0.0.0", "address both servers listen on")
    http_port: int = _s(8000, "HTTP port")
    grpc_port: int = _s(50051, "gRPC port; 0 disables gRPC")
    device: str = _s("cpu", "cpu | cuda | cuda:N")
    dtype: str = _s("fp32", "transformer compute dtype: fp32 (a seed gives the same image whatever shares its "
                            "batch) | bf16 (faster; batch composition can change tokens) | fp16 | auto (bf16 "
                            "on CUDA and on CPUs with AMX or AVX512-BF16, else fp32)")
    max_rows: int = _s(64, "rows per transformer forward; an image takes 2 (cond + uncond)")
    max_waiting: int = _s(256, "requests queued beyond the running batch; more get 429")
    max_images: int | None = _s(None, "images per request (n) at most; none: min(8, max_rows/2)")
    max_prompt_chars: int = _s(2000, "prompt length in characters at most")
    max_upload_bytes: int = _s(4 * 1024 * 1024, "an edit's image (and its mask) in bytes at most, PNG")
    request_timeout_s: float = _s(300.0, "per-request deadline in seconds, queueing included")
    preview_every: int = _s(0, "default preview interval of streams in steps; 0: steps/8")
    heartbeat_s: float = _s(5.0, "seconds between SSE comment lines while a streamed request waits")
    grace_s: float = _s(30.0, "on SIGTERM: seconds running and queued requests get to finish")
    decode_workers: int = _s(2, "threads that decode tokens and encode PNGs off the step loop")
    decode_batch: int = _s(1, "images per VQVAE decode call; 1 (the default) makes every image's bytes "
                              "independent of what else finished in the same step")
    intra_op_threads: int = _s(0, "torch intra-op threads; 0: the CPUs this process may use minus "
                                  "decode_workers, at least 1 (server/threads.py)")
    omp_wait_policy: str = _s("passive", "OpenMP wait policy, passive | active: active threads spin "
                                         "between parallel regions, which steals CPU from the decode "
                                         "threads and the HTTP/gRPC loops (server/threads.py)")
    compile: str = _s("off", "the transformer forward: off (eager) | default | reduce-overhead (CUDA graphs) | "
                             "max-autotune: torch.compile modes; a compiled forward runs each batch padded to "
                             "a power-of-two row bucket, at most log2(max_rows) + 1 shapes, each compiled at "
                             "start-up (model/sampling/buckets.py)")
    warmup: bool = _s(True, "at start-up, draw one 2-step image through the sampler, the step kernels and the "
                            "decoder before serving: a Triton, compiler or device fault stops the server "
                            "then, not at the first request (server/warmup.py)")
    api_keys: tuple[str, ...] = _s((), "comma-separated bearer keys; none: no authentication")
    role: str = _s("single", "single (engine and both front ends in one process) | worker (the engine, taking "
                             "jobs from Redis: server/worker.py) | api (the front ends, sending jobs to Redis)")
    redis_url: str | None = _s(None, "the Redis that API nodes and workers share (redis://HOST:PORT/DB); "
                                     "required for --role worker and --role api")
    worker_name: str | None = _s(None, "this worker's consumer name in Redis; none: HOSTNAME-PID")
    lease_s: float = _s(5.0, "worker lease: heartbeat every lease/3; a worker silent this long is dead and "
                             "its jobs go to another worker")
    max_deliveries: int = _s(3, "times a job is handed to a worker before it is dead-lettered and failed")
    worker_port: int = _s(8001, "worker role: port of /healthz, /readyz and /metrics; 0 disables them")

    def __post_init__(self) -> None:
        if self.max_images is None and isinstance(self.max_rows, int):
            object.__setattr__(self, "max_images", min(8, max(1, self.max_rows // 2)))

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise BadSetting(name, getattr(self, name), expected)

        check("http_port", 0 < self.http_port < 65536, "a port in 1..65535")
        check("grpc_port", 0 <= self.grpc_port < 65536, "a port in 0..65535 (0 disables gRPC)")
        check("dtype", self.dtype in ("fp32", "bf16", "fp16", "auto"), "fp32 | bf16 | fp16 | auto")
        check("max_rows", self.max_rows >= 2 and self.max_rows % 2 == 0, "an even number >= 2")
        check("max_waiting", self.max_waiting >= 0, "an integer >= 0")
        check("max_images", 1 <= self.max_images <= self.max_rows // 2, f"1..max_rows/2 ({self.max_rows // 2})")
        check("max_prompt_chars", self.max_prompt_chars >= 1, "an integer >= 1")
        check("max_upload_bytes", self.max_upload_bytes >= 1024, "an integer >= 1024")
        check("request_timeout_s", self.request_timeout_s > 0, "seconds > 0")
        check("preview_every", self.preview_every >= 0, "an integer >= 0")
        check("heartbeat_s", self.heartbeat_s > 0, "seconds > 0")
        check("grace_s", self.grace_s >= 0, "seconds >= 0")
        check("decode_workers", self.decode_workers >= 1, "an integer >= 1")
        check("decode_batch", self.decode_batch >= 1, "an integer >= 1")
        check("intra_op_threads", self.intra_op_threads >= 0, "an integer >= 0 (0: choose automatically)")
        check("omp_wait_policy", self.omp_wait_policy in ("passive", "active"), "passive | active")
        check("compile", self.compile in COMPILE_MODES, " | ".join(COMPILE_MODES))
        check("role", self.role in ROLES, " | ".join(ROLES))
        check("redis_url", self.redis_url is None or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
              "a redis://, rediss:// or unix:// URL")
        check("worker_name", self.worker_name is None or (self.worker_name.strip() == self.worker_name != ""),
              "a name without surrounding spaces")
        check("lease_s", self.lease_s > 0, "seconds > 0")
        check("max_deliveries", self.max_deliveries >= 1, "an integer >= 1")
        check("worker_port", 0 <= self.worker_port < 65536, "a port in 0..65535 (0 disables it)")

    def check_role(self) -> None:
        """What the role needs besides valid values: the worker and api roles share a Redis. Checked
        when the server starts, as one setting alone can't tell."""
        if self.role != "single" and not self.redis_url:
            raise BadSetting("redis_url", self.redis_url, f"a redis:// URL: --role {self.role} needs one",
                             source=f"{flag_name('redis_url')} (${env_name('redis_url')})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then ``VQDIFF_<FIELD>`` variables of ``env`` (default ``os.environ``), then
        ``overrides``: the flags by field name. A string override is parsed as a variable's text is
        (``--api-keys a,b``); other values are taken as they are; None means not given."""
        env = os.environ if env is None else env
        check_names(env)
        values, flags = {}, set()
        for name, hint in _hints().items():
            raw = env.get(env_name(name))
            if raw:  # an empty variable is unset: compose passes ${X:-} through as ""
                values[name] = _parse(env_name(name), raw, hint)
            given = overrides.pop(name, None)
            if given is not None:
                values[name] = _parse(flag_name(name), given, hint) if isinstance(given, str) else given
                flags.add(name)
        if overrides:
            raise TypeError(f"Settings.from_env: no settings named {sorted(overrides)}")
        if "api_keys" in values:
            values["api_keys"] = tuple(values["api_keys"])
        try:
            return cls(**values)
        except BadSetting as e:
            raise (e.from_flag() if e.name in flags else e) from None


class BadSetting(ValueError):
    """A value ``Settings`` refuses; the message names the variable (or the flag) and the value."""

    def __init__(self, name: str, value, expected: str, source: str | None = None):
        self.name, self.value, self.expected = name, value, expected
        super().__init__(f"{source or env_name(name)}: {value!r} is not allowed; expected {expected}")

    def from_flag(self) -> BadSetting:
        return BadSetting(self.name, self.value, self.expected, source=flag_name(self.name))


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_names(env: Mapping[str, str]) -> None:
    """Refuse a ``VQDIFF_*`` variable (any case) that is neither a setting nor in ``OTHER_VARIABLES``."""
    known = sorted({env_name(f.name) for f in fields(Settings)} | set(OTHER_VARIABLES))
    for key in sorted(env):
        if key.upper().startswith(ENV_PREFIX) and key not in known:
            # compared without the prefix, which every candidate shares: VQDIFF_PORT is nearer
            # VQDIFF_HTTP_PORT than VQDIFF_HOST
            rest = {k[len(ENV_PREFIX):]: k for k in known}
            closest = rest[difflib.get_close_matches(key[len(ENV_PREFIX):].upper(), list(rest), n=1, cutoff=0.0)[0]]
            raise ValueError(f"{key}: no such setting; did you mean {closest}? "
                             f"(the settings are the flags of `vqdiff serve --help`)")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field. Values stay text: ``Settings.from_env`` parses them as it parses variables,
    so a flag and its variable accept the same values and fail with the same message."""
    for f in fields(Settings):
        default = "" if f.default in (None, ()) else f" (default {f.default})"
        help = f"{f.metadata['help']}{default}; ${env_name(f.name)}"
        parser.add_argument(flag_name(f.name), dest=f.name, default=None, metavar=_metavar(f.name),
                            help=help.replace("%", "%%"))


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """The settings of a parsed ``vqdiff serve`` command line over ``env``."""
    return Settings.from_env(env, **{f.name: getattr(args, f.name) for f in fields(Settings)})


def _hints() -> dict[str, object]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in fields(Settings)}


def _base(hint) -> type:
    """int for ``int | None``, tuple for ``tuple[str, ...]``, else the type itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    return args[0] if args and origin is not None else hint


def _metavar(name: str) -> str:
    # the float settings are all durations (their names end in _s)
    return {int: "INT", float: "SECONDS", Path: "DIR", tuple: "A,B,...", bool: "true|false"}.get(_base(_hints()[name]), "TEXT")


def _split(raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


def _bool(raw: str) -> bool:
    words = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
    try:
        return words[raw.strip().lower()]
    except KeyError:
        raise ValueError(raw) from None


# how a variable's (or a flag's) text becomes each type of setting
_PARSERS = {int: int, float: float, str: str, Path: Path, tuple: _split, bool: _bool}
_EXPECTED = {int: "an integer", float: "a number", bool: "true | false"}


def _parse(source: str, raw: str, hint):
    parse = _PARSERS.get(_base(hint))
    if parse is None:
        raise TypeError(f"{source}: settings of type {hint} have no parser in server/settings.py")
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{source}: {raw!r} is not allowed; expected {_EXPECTED[_base(hint)]}") from None
