"""What a client function may touch when it has no store credentials: the URLs the driver presigned for one task
(read by :class:`gradshard.store.presigned.PresignedStore`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ClientUrls(BaseModel):
    """What a client may touch, presigned by the driver: a GET of each whole object it reads (URL, size) and a PUT
    of each object it writes (its update; with error feedback, its residual; with secure aggregation, its protocol
    records). With them the client function needs no store credentials at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gets: dict[str, tuple[str, int]]
    puts: dict[str, str]
