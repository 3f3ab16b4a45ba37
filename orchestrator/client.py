"""A small client of the `/v1` API, used by `slimmoa submit / status / export / cancel / retry`.

client = ApiClient("http://127.0.0.1:8000", token=None)
job, _ = client.submit_file(Path("prompts.jsonl"), recipe="synthetic")
client.job(job.id).progress.items
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from orchestrator.api.bodies import NOTICE_HEADER, JobDetailPublic, JobPublic
from orchestrator.contracts import RetryResult, RetryStage
from orchestrator.errors import ApiError
from orchestrator.exports import METADATA_HEADER, ExportFormat

__all__ = ["ApiClient", "Download"]

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Download:
    """A streamed export: its metadata record (from the response header) and its body in chunks."""

    metadata: dict[str, Any]
    chunks: Iterator[bytes]


class ApiClient:
    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            response.read()
            try:
                detail = str(response.json().get("detail"))
            except ValueError:
                detail = response.text or response.reason_phrase
            raise ApiError(response.status_code, f"{response.status_code} {detail}")
        return response

    def _unreachable(self, exc: httpx.TransportError) -> ApiError:
        return ApiError(0, f"cannot reach the API at {self.base_url}: {exc}")

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._check(self._http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def submit_file(
        self,
        path: Path,
        recipe: str,
        *,
        name: str | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
        fields: Mapping[str, str] | None = None,
        input_format: str | None = None,
    ) -> tuple[JobPublic, str | None]:
        """Upload a prompt file as a new job (or the key's earlier job); `fields` maps columns to fields,
        `input_format` overrides the file name's suffix. Returns the job and the API's notice, if any (a
        job stored while the broker was unreachable)."""
        data = {"recipe": recipe, "priority": str(priority)} | ({"name": name} if name else {})
        data |= {"fields": json.dumps(dict(fields))} if fields else {}
        data |= {"input_format": str(input_format)} if input_format else {}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with path.open("rb") as handle:
            files = {"file": (path.name, handle, "application/octet-stream")}
            response = self._request("POST", "/v1/jobs", data=data, files=files, headers=headers)
        return JobPublic.model_validate(response.json()), response.headers.get(NOTICE_HEADER)

    def job(self, job_id: str) -> JobDetailPublic:
        return JobDetailPublic.model_validate(self._request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def retry(
        self, job_id: str, stage: RetryStage = RetryStage.ALL, items: Sequence[int] | None = None
    ) -> RetryResult:
        body = {"stage": stage.value, "items": list(items) if items is not None else None}
        return RetryResult.model_validate(self._request("POST", f"/v1/jobs/{job_id}/retry", json=body).json())

    @contextmanager
    def results(
        self, job_id: str, export_format: ExportFormat, *, rejected: str | None = None
    ) -> Iterator[Download]:
        """The export of a job's finished items, streamed in chunks while the block runs."""
        params = {"format": export_format.value} | ({"rejected": rejected} if rejected else {})
        request = self._http.build_request("GET", f"/v1/jobs/{job_id}/results", params=params)
        try:
            response = self._check(self._http.send(request, stream=True))
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        try:
            yield Download(json.loads(response.headers.get(METADATA_HEADER, "{}")), self._body(response))
        finally:
            response.close()

    def _body(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
