"""/v1/datasets: upload a calibration corpus (.txt or .jsonl) and read it back."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.deps import DatabaseDep, PrincipalDep, SessionDep, SettingsDep, StorageDep, UnitOfWorkRoute
from app.schemas import DatasetOut, Problem
from app.services import datasets as datasets_service

router = APIRouter(prefix="/datasets", tags=["datasets"], route_class=UnitOfWorkRoute)


# Besides the problems every /v1 route documents (app.main): a body that is not valid multipart is a 400.
_UPLOAD_RESPONSES: dict[int | str, dict[str, object]] = {
    400: {"model": Problem, "description": "the body is not valid multipart/form-data (application/problem+json)"},
}


@router.post("", status_code=201, response_model=DatasetOut, responses=_UPLOAD_RESPONSES)
def upload_dataset(
    file: Annotated[UploadFile, File(description=".txt (UTF-8) or .jsonl (one JSON object per line)")],
    response: Response,
    db: DatabaseDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    storage: StorageDep,
    name: Annotated[str | None, Form(max_length=255)] = None,
    text_field: Annotated[str | None, Form(max_length=128, description="JSONL field holding the text")] = None,
) -> DatasetOut:
    """Upload a calibration corpus into object storage; jobs refer to it by id."""
    dataset = datasets_service.upload_dataset(
        db.session,
        storage,
        settings,
        principal,
        src=file.file,
        filename=file.filename,
        name=name,
        text_field=text_field,
    )
    response.headers["Location"] = f"/v1/datasets/{dataset.id}"
    return datasets_service.dataset_out(dataset)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: uuid.UUID, session: SessionDep, principal: PrincipalDep) -> DatasetOut:
    """An uploaded dataset's metadata."""
    return datasets_service.dataset_out(datasets_service.get_dataset(session, dataset_id, principal))
