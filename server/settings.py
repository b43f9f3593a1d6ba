"""Every server knob in one frozen object: defaults, then ``VQDIFF_*`` environment variables, then flags.

``Settings.from_env()`` reads the environment; ``vqdiff serve`` flags override single fields with
``dataclasses.replace``. Bad values fail at start-up with the variable's name, never at the first
request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "VQDIFF_"


@dataclass(frozen=True)
class Settings:
    model: Path | None = None  # model folder; None: $VQDIFF_MODEL, else the embedded default model
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 50051  # 0 disables gRPC
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    # the transformer's compute dtype: fp32 | bf16 | fp16 | auto (bf16 on CUDA and on CPUs with bf16
    # matrix units (AMX / AVX512-BF16), else fp32). fp32 is the default because only there (on CPU)
    # is an image bit-identical whatever else shares its batch; bf16 is faster (docs/BENCHMARKS.md)
    dtype: str = "fp32"
    max_rows: int = 64  # rows per transformer forward; an image takes 2 (cond + uncond)
    max_waiting: int = 256  # requests queued beyond the running batch; more get 429
    max_images: int | None = None  # n per request; None: min(8, max_rows / 2)
    max_prompt_chars: int = 2000
    request_timeout_s: float = 300.0  # per-request deadline, queueing included
    preview_every: int = 0  # default preview interval for streams (steps); 0: the server picks
    heartbeat_s: float = 5.0  # SSE comment lines while a streamed request waits
    grace_s: float = 30.0  # on SIGTERM: how long running requests may take to finish
    decode_workers: int = 2  # threads that decode tokens and encode PNGs off the step loop
    api_keys: tuple[str, ...] = field(default=())  # none: no authentication

    def __post_init__(self) -> None:
        if self.max_images is None and isinstance(self.max_rows, int):
            object.__setattr__(self, "max_images", min(8, max(1, self.max_rows // 2)))

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: {getattr(self, name)!r} is not allowed; expected {expected}")

        check("http_port", 0 < self.http_port < 65536, "a port in 1..65535")
        check("grpc_port", 0 <= self.grpc_port < 65536, "a port in 0..65535 (0 disables gRPC)")
        check("dtype", self.dtype in ("fp32", "bf16", "fp16", "auto"), "fp32 | bf16 | fp16 | auto")
        check("max_rows", self.max_rows >= 2 and self.max_rows % 2 == 0, "an even number >= 2")
        check("max_waiting", self.max_waiting >= 0, "an integer >= 0")
        check("max_images", 1 <= self.max_images <= self.max_rows // 2, f"1..max_rows/2 ({self.max_rows // 2})")
        check("max_prompt_chars", self.max_prompt_chars >= 1, "an integer >= 1")
        check("request_timeout_s", self.request_timeout_s > 0, "seconds > 0")
        check("preview_every", self.preview_every >= 0, "an integer >= 0")
        check("heartbeat_s", self.heartbeat_s > 0, "seconds > 0")
        check("grace_s", self.grace_s >= 0, "seconds >= 0")
        check("decode_workers", self.decode_workers >= 1, "an integer >= 1")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then ``VQDIFF_<FIELD>`` variables (``VQDIFF_API_KEYS`` is comma-separated),
        then ``overrides`` (flags; None means not given)."""
        env = os.environ if env is None else env
        values: dict = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, cls.__dataclass_fields__[f.name].default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "api_keys" in values:
            values["api_keys"] = tuple(values["api_keys"])
        return cls(**values)


def _parse(name: str, raw: str, default):
    try:
        if name == "model":
            return Path(raw)
        if name == "api_keys":
            return tuple(k.strip() for k in raw.split(",") if k.strip())
        if name == "max_images":
            return int(raw)
        if isinstance(default, bool):
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}: {raw!r} is not a valid {type(default).__name__}") from None
