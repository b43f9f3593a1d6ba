from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAMPLER_UNSPECIFIED: _ClassVar[Sampler]
    SAMPLER_PURITY: _ClassVar[Sampler]
    SAMPLER_RANDOM: _ClassVar[Sampler]
    SAMPLER_POSTERIOR: _ClassVar[Sampler]
    SAMPLER_SKIP: _ClassVar[Sampler]

class Uncond(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNCOND_UNSPECIFIED: _ClassVar[Uncond]
    UNCOND_AUTO: _ClassVar[Uncond]
    UNCOND_NULL: _ClassVar[Uncond]
    UNCOND_EMPTY: _ClassVar[Uncond]
    UNCOND_NEGATIVE: _ClassVar[Uncond]

class UnmaskSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UNMASK_SCHEDULE_UNSPECIFIED: _ClassVar[UnmaskSchedule]
    UNMASK_SCHEDULE_LINEAR: _ClassVar[UnmaskSchedule]
    UNMASK_SCHEDULE_COSINE: _ClassVar[UnmaskSchedule]
SAMPLER_UNSPECIFIED: Sampler
SAMPLER_PURITY: Sampler
SAMPLER_RANDOM: Sampler
SAMPLER_POSTERIOR: Sampler
SAMPLER_SKIP: Sampler
UNCOND_UNSPECIFIED: Uncond
UNCOND_AUTO: Uncond
UNCOND_NULL: Uncond
UNCOND_EMPTY: Uncond
UNCOND_NEGATIVE: Uncond
UNMASK_SCHEDULE_UNSPECIFIED: UnmaskSchedule
UNMASK_SCHEDULE_LINEAR: UnmaskSchedule
UNMASK_SCHEDULE_COSINE: UnmaskSchedule

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "n", "seed", "steps", "guidance_scale", "truncation_rate", "sampler", "purity_weight", "uncond", "preview_every", "model", "image", "mask", "strength", "unmask_schedule")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    PURITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    UNCOND_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    UNMASK_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    n: int
    seed: int
    steps: int
    guidance_scale: float
    truncation_rate: float
    sampler: Sampler
    purity_weight: float
    uncond: Uncond
    preview_every: int
    model: str
    image: bytes
    mask: bytes
    strength: float
    unmask_schedule: UnmaskSchedule
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., n: _Optional[int] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., truncation_rate: _Optional[float] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., purity_weight: _Optional[float] = ..., uncond: _Optional[_Union[Uncond, str]] = ..., preview_every: _Optional[int] = ..., model: _Optional[str] = ..., image: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., strength: _Optional[float] = ..., unmask_schedule: _Optional[_Union[UnmaskSchedule, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("png", "seed")
    PNG_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    seed: int
    def __init__(self, png: _Optional[bytes] = ..., seed: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "denoise_ms", "decode_ms", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    denoise_ms: float
    decode_ms: float
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., denoise_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("guidance_scale", "uncond", "negative_prompt", "truncation_rate", "sampler", "steps", "purity_weight", "seed", "unmask_schedule")
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    UNCOND_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PURITY_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    UNMASK_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    guidance_scale: float
    uncond: Uncond
    negative_prompt: str
    truncation_rate: float
    sampler: Sampler
    steps: int
    purity_weight: float
    seed: int
    unmask_schedule: UnmaskSchedule
    def __init__(self, guidance_scale: _Optional[float] = ..., uncond: _Optional[_Union[Uncond, str]] = ..., negative_prompt: _Optional[str] = ..., truncation_rate: _Optional[float] = ..., sampler: _Optional[_Union[Sampler, str]] = ..., steps: _Optional[int] = ..., purity_weight: _Optional[float] = ..., seed: _Optional[int] = ..., unmask_schedule: _Optional[_Union[UnmaskSchedule, str]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("id", "seed", "images", "timings", "params")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    id: str
    seed: int
    images: _containers.RepeatedCompositeFieldContainer[Image]
    timings: Timings
    params: GenerationParams
    def __init__(self, id: _Optional[str] = ..., seed: _Optional[int] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("step", "total", "unmasked", "previews")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    UNMASKED_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    unmasked: float
    previews: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., unmasked: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...
