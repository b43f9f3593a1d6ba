"""The models a process serves, by name: what the front ends route a request to.

A single process serves one model. An API node serves every model its workers published in Redis;
the set changes while it runs (server/remote.py refreshes it off the event loop). A request names
its model (``model`` in the body or the proto); one that names none gets the default:

- the model the node was started with (``--model``: a folder for the single process, a published
  model's name for the API role), else
- the only model served; with several and no default, the request must name one.

``Catalog.resolve`` raises ``ValueError`` for a model that is not served (422, ``param: model``) and
``Unavailable`` while nothing is served yet (an API node whose workers have not published a model:
503 + Retry-After).
"""

from __future__ import annotations

from dataclasses import dataclass

from vqdiff.model.sampling.params import GenerationParams, split_defaults
from vqdiff.model.sampling.sampler import default_params
from vqdiff.server.scheduler import Unavailable


@dataclass(frozen=True)
class Served:
    """One model a front end can route to."""

    name: str
    model: object  # the model (single process) or its stand-in (``remote.RemoteModel``): what
    # ``request_params`` and ``engine.validate`` read
    info: dict  # what GET /v1/models shows (``server.main.model_info`` fields)

    @property
    def defaults(self) -> GenerationParams:
        return default_params(self.model)

    @property
    def few_steps(self) -> dict | None:
        """The model folder's few-steps rule (``params.split_defaults``), or None."""
        return split_defaults(self.model.generation_defaults)[1]

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])


class Catalog:
    def __init__(self, served: dict[str, Served] | None = None, default: str | None = None):
        self._served: dict[str, Served] = dict(served or {})
        self.default = default

    @classmethod
    def of(cls, served: Served) -> Catalog:
        return cls({served.name: served}, served.name)

    def replace(self, served: dict[str, Served]) -> None:
        """The served set from now on (one assignment: readers on other threads see old or new)."""
        self._served = dict(served)

    def all(self) -> list[Served]:
        return [self._served[k] for k in sorted(self._served)]

    def names(self) -> list[str]:
        return sorted(self._served)

    def __contains__(self, name: str) -> bool:
        return name in self._served

    def resolve(self, name: str | None) -> Served:
        served = self._served
        if not served:
            raise Unavailable("no model is served yet: no worker has published one")
        if name is None:
            if self.default is not None:
                if self.default not in served:
                    raise Unavailable(f"the default model {self.default!r} is not served yet "
                                      f"(served: {', '.join(sorted(served))})")
                return served[self.default]
            if len(served) == 1:
                return next(iter(served.values()))
            raise ValueError(f"model: required, this server serves several models: {', '.join(sorted(served))}")
        if name not in served:
            raise ValueError(f"model: {name!r} is not served here; served: {', '.join(sorted(served))}")
        return served[name]
